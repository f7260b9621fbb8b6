# Device side, first thing in every call: the wheels the device image lacks, into its own interpreter.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .device-data/wheels/*.whl \
  || { echo "wheel install failed: carry .device-data/wheels"; exit 1; }
