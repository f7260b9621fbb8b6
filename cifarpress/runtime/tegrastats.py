"""Read NVIDIA Jetson `tegrastats` lines: memory, CPU, GPU, temperatures and power rails.

One parser covers the JetPack 4 (Nano, TX2, Xavier), 5 and 6 (Orin) layouts:
fields are found by pattern anywhere in the line, not by position, because the
set and order of fields change between boards and releases. Formats handled:

  * optional leading timestamp `MM-DD-YYYY HH:MM:SS` (JetPack 5+)
  * `RAM used/totalMB`, `SWAP used/totalMB (cached NMB)`
  * `CPU [load%@MHz,...,off]`, or the older `CPU [load%,...]@MHz`
  * `GR3D_FREQ load%`, `load%@MHz` or `load%@[MHz,MHz]` (one clock per GPC); `EMC_FREQ` likewise
  * temperatures `name@valueC` (also `name@valueC/valueC`); -256C marks a sensor
    that is switched off and is dropped
  * power rails `NAME current/average` in mW, with or without the `mW` suffix
    (JetPack 4 prints bare numbers), and a third `/max` value on newer releases

A line without a `RAM` field is not a sample (a banner, an error, a comment, a
line cut short before RAM): `parse_line` returns None and callers skip it. Any
other field that is missing or garbled is left as None; parsing never raises.

Total power: the module input rail when the board has one (`VDD_IN` on Xavier NX,
TX2 and Orin NX/Nano; `POM_5V_IN` on Nano). AGX Orin reports no input rail: its
total is VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0, VIN_SYS_5V0 being only the
5 V system rail. Any other board (AGX Xavier: GPU, CPU, SOC, CV, VDDRQ, SYS5V)
gets the sum of its rails, `NC` (not connected) channels left out. The sums are
estimates; `total_power_source` says which rule was applied.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime

from cifarpress.errors import CifarpressError

INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
AGX_ORIN_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")
SENSOR_OFF_C = -256.0  # what tegrastats prints for a thermal zone that is powered down

_TIMESTAMP = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB(?: \(cached (\d+)MB\))?")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_TEMP = re.compile(r"(?<![\w%@])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C(?:/-?\d+(?:\.\d+)?C)?(?!\w)")
# A rail value carries no unit or mW; RAM/SWAP/IRAM carry MB/kB and so never match.
_RAIL = re.compile(r"(?<![\w@/])([A-Za-z][\w]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/\d+(?:mW)?)?(?![\w/])")
_LOAD_FREQ = re.compile(r"^(?:(\d+)%)?(?:@(?:\[([\d,]*)\]|(\d+)))?$")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}


@dataclass
class CpuCore:
    active: bool  # False when tegrastats prints `off` (core powered down by the power mode)
    load_percent: float | None = None
    freq_mhz: int | None = None


@dataclass
class PowerRail:
    current_mw: float
    average_mw: float  # tegrastats' own running average since it started


@dataclass
class TegraSample:
    ram_used_mb: int
    ram_total_mb: int
    timestamp: str | None = None  # ISO 8601, when the line carries one (JetPack 5+)
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    swap_cached_mb: int | None = None
    cpus: list[CpuCore] = field(default_factory=list)
    gpu_load_percent: float | None = None
    gpu_freq_mhz: list[int] = field(default_factory=list)
    emc_load_percent: float | None = None
    emc_freq_mhz: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    rails: dict[str, PowerRail] = field(default_factory=dict)
    total_power_mw: float | None = None
    total_power_source: str | None = None

    @property
    def cpu_load_mean(self) -> float | None:
        loads = [c.load_percent for c in self.cpus if c.active and c.load_percent is not None]
        return sum(loads) / len(loads) if loads else None

    def to_dict(self) -> dict:
        return asdict(self)


def _timestamp(line: str) -> str | None:
    m = _TIMESTAMP.match(line)
    if not m:
        return None
    try:
        return datetime.strptime(m.group(1), "%m-%d-%Y %H:%M:%S").isoformat()
    except ValueError:
        return None


def _cpus(line: str) -> list[CpuCore]:
    m = _CPU.search(line)
    if not m:
        return []
    shared_freq = int(m.group(2)) if m.group(2) else None  # old layout: one clock after the list
    cores = []
    for item in (s.strip() for s in m.group(1).split(",")):
        if item == "off":
            cores.append(CpuCore(active=False))
            continue
        core = _CORE.match(item)
        if core:
            freq = int(core.group(2)) if core.group(2) else shared_freq
            cores.append(CpuCore(active=True, load_percent=float(core.group(1)), freq_mhz=freq))
        else:  # unreadable entry: keep its slot so core indices stay right
            cores.append(CpuCore(active=True))
    return cores


def _load_and_freqs(line: str, name: str) -> tuple[float | None, list[int]]:
    m = re.search(rf"\b{name} (\S+)", line)
    if not m:
        return None, []
    parts = _LOAD_FREQ.match(m.group(1))
    if not parts:
        return None, []
    load = float(parts.group(1)) if parts.group(1) is not None else None
    if parts.group(2) is not None:
        freqs = [int(f) for f in parts.group(2).split(",") if f]
    else:
        freqs = [int(parts.group(3))] if parts.group(3) else []
    return load, freqs


def _temperatures(line: str) -> dict[str, float]:
    temps = {}
    for name, value in _TEMP.findall(line):
        if float(value) != SENSOR_OFF_C:
            temps[name] = float(value)
    return temps


def _rails(line: str) -> dict[str, PowerRail]:
    return {name: PowerRail(float(cur), float(avg)) for name, cur, avg in _RAIL.findall(line)
            if name not in _NOT_RAILS}


def total_power(rails: dict[str, PowerRail]) -> tuple[float | None, str | None]:
    """(milliwatts, rule used); see the module docstring for the rules."""
    for name in INPUT_RAILS:
        if name in rails:
            return rails[name].current_mw, name
    if all(name in rails for name in AGX_ORIN_RAILS):
        return sum(rails[n].current_mw for n in AGX_ORIN_RAILS), "+".join(AGX_ORIN_RAILS)
    connected = {n: r for n, r in rails.items() if n != "NC"}
    if not connected:
        return None, None
    return sum(r.current_mw for r in connected.values()), "sum of " + "+".join(connected)


def parse_line(line: str) -> TegraSample | None:
    """One tegrastats line as a TegraSample, or None when the line is not a sample."""
    ram = _RAM.search(line)
    if not ram:
        return None
    sample = TegraSample(ram_used_mb=int(ram.group(1)), ram_total_mb=int(ram.group(2)), timestamp=_timestamp(line))
    swap = _SWAP.search(line)
    if swap:
        sample.swap_used_mb, sample.swap_total_mb = int(swap.group(1)), int(swap.group(2))
        sample.swap_cached_mb = int(swap.group(3)) if swap.group(3) else None
    sample.cpus = _cpus(line)
    sample.gpu_load_percent, sample.gpu_freq_mhz = _load_and_freqs(line, "GR3D_FREQ")
    sample.emc_load_percent, emc_freqs = _load_and_freqs(line, "EMC_FREQ")
    sample.emc_freq_mhz = emc_freqs[0] if emc_freqs else None
    sample.temperatures_c = _temperatures(line)
    sample.rails = _rails(line)
    sample.total_power_mw, sample.total_power_source = total_power(sample.rails)
    return sample


def parse_lines(lines) -> tuple[list[TegraSample], int]:
    """(samples, number of skipped non-sample lines); blank lines are ignored."""
    samples, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        sample = parse_line(line)
        if sample is None:
            skipped += 1
        else:
            samples.append(sample)
    return samples, skipped


def _stats(values) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": sum(values) / len(values), "max": max(values), "min": min(values)}


def summarize(samples: list[TegraSample], skipped: int = 0) -> dict:
    """Mean/max of RAM, CPU and GPU load and total power over `samples`, plus the hottest reading per sensor."""
    temps: dict[str, float] = {}
    for s in samples:
        for name, value in s.temperatures_c.items():
            temps[name] = max(value, temps.get(name, value))
    sources = sorted({s.total_power_source for s in samples if s.total_power_source})
    return {
        "samples": len(samples),
        "skipped_lines": skipped,
        "ram_total_mb": samples[-1].ram_total_mb if samples else None,
        "ram_used_mb": _stats(s.ram_used_mb for s in samples),
        "cpu_load_percent": _stats(s.cpu_load_mean for s in samples),
        "gpu_load_percent": _stats(s.gpu_load_percent for s in samples),
        "total_power_mw": _stats(s.total_power_mw for s in samples),
        "total_power_source": ", ".join(sources) or None,
        "max_temperature_c": temps,
    }


class TegraStatsSampler:
    """Runs `tegrastats --interval N` for the length of a with-block and keeps every sample.

        with TegraStatsSampler(interval_ms=100) as stats:
            run_benchmark()
        print(stats.summary())

    Choose the interval so the block spans at least ten samples. tegrastats can
    need root for some fields on older JetPacks; missing fields stay None.
    """

    def __init__(self, interval_ms: int = 100, executable: str = "tegrastats"):
        if interval_ms < 1:
            raise CifarpressError(f"tegrastats interval must be at least 1 ms, not {interval_ms}")
        self.interval_ms = int(interval_ms)
        self.executable = executable
        self._samples: list[TegraSample] = []
        self._skipped = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def _command(self, path: str) -> list[str]:
        command = [path, "--interval", str(self.interval_ms)]
        # tegrastats uses C stdio: into a pipe it block-buffers, so samples would
        # arrive in bursts and the tail be lost at exit; stdbuf makes it line-buffered.
        stdbuf = shutil.which("stdbuf")
        return [stdbuf, "-oL", *command] if stdbuf else command

    def __enter__(self) -> TegraStatsSampler:
        path = shutil.which(self.executable)
        if path is None:
            raise CifarpressError("--device jetson needs NVIDIA's tegrastats on PATH; run it on a Jetson with JetPack")
        self._samples, self._skipped = [], 0
        # stderr to a file: a chatty tegrastats must not block on a full pipe nobody reads while sampling
        self._stderr = tempfile.TemporaryFile(mode="w+", errors="replace")
        # own session, so stopping it also stops anything it started (a wrapper script's sleep)
        self._proc = subprocess.Popen(self._command(path), stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, errors="replace", bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            sample = parse_line(line) if line.strip() else None
            with self._lock:
                if sample is not None:
                    self._samples.append(sample)
                elif line.strip():
                    self._skipped += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        proc = self._proc
        exited_alone = proc.poll() is not None
        if not exited_alone:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._reader.join(timeout=3)
        proc.stdout.close()
        self._stderr.seek(0)
        stderr = self._stderr.read()
        self._stderr.close()
        if exc_type is None and exited_alone and proc.returncode != 0 and not self._samples:
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            raise CifarpressError(f"tegrastats exited with status {proc.returncode} ({last[:200]}); "
                                  f"try running it by hand, or with sudo")

    @property
    def samples(self) -> list[TegraSample]:
        with self._lock:
            return list(self._samples)

    def summary(self) -> dict:
        with self._lock:
            result = summarize(list(self._samples), self._skipped)
        result["interval_ms"] = self.interval_ms
        return result
