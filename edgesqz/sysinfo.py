"""Facts about the machine, read from /proc, /sys and (on a Pi) vcgencmd. Never raises.

Used by ``edgesqz doctor`` and stored in ``edgesqz bench`` reports so that numbers from
different boards can be compared honestly (a throttled Pi at 600 MHz is not a Pi at 1.8 GHz).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip().strip("\x00")
    except OSError:
        return None


def cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def board_model() -> str | None:
    """E.g. 'Raspberry Pi 5 Model B Rev 1.0' (device tree), None elsewhere."""
    return _read("/proc/device-tree/model") or _read("/sys/firmware/devicetree/base/model")


def governor() -> str | None:
    return _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")


def cpu_mhz() -> dict[str, float] | None:
    cur = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    top = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if cur is None:
        return None
    return {"current": int(cur) / 1000, **({"max": int(top) / 1000} if top else {})}


def temperature_c() -> float | None:
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        value = _read(zone / "temp")
        if value and value.lstrip("-").isdigit():
            return int(value) / 1000
    return None


def throttled() -> dict[str, Any] | None:
    """``vcgencmd get_throttled`` decoded (Raspberry Pi only)."""
    exe = shutil.which("vcgencmd")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=5).stdout
        bits = int(out.strip().split("=")[1], 16)
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None
    return {"raw": hex(bits), "under_voltage": bool(bits & 0x1), "frequency_capped": bool(bits & 0x2),
            "throttled": bool(bits & 0x4), "soft_temp_limit": bool(bits & 0x8),
            "throttled_since_boot": bool(bits & 0x40000)}


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    """True if ``module`` could be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cameras() -> list[str]:
    return sorted(str(p) for p in Path("/dev").glob("video*"))


def coral_devices() -> list[str]:
    """Attached Coral accelerators: USB (vendor 1a6e before firmware load, 18d1:9302 after) and PCIe."""
    found = []
    for dev in Path("/sys/bus/usb/devices").glob("*"):
        vendor, product = _read(dev / "idVendor"), _read(dev / "idProduct")
        if vendor == "1a6e" or (vendor == "18d1" and product == "9302"):
            found.append(f"usb:{dev.name} ({vendor}:{product})")
    found += [f"pci:{p}" for p in sorted(Path("/dev").glob("apex_*"))]
    return found


def _connects(family: int, address: Any, timeout: float) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
    except (OSError, ValueError):
        return False
    return True


def display_check(timeout: float = 0.5) -> tuple[bool, str]:
    """(is there a display to open a window on, what was found): connects to the X server or Wayland
    compositor the environment names instead of trusting the variable (``DISPLAY=:99`` with no server)."""
    wayland = os.environ.get("WAYLAND_DISPLAY")
    if wayland:
        path = wayland if wayland.startswith("/") else os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/"), wayland)
        if _connects(socket.AF_UNIX, path, timeout):
            return True, f"Wayland display {wayland}"
    display = os.environ.get("DISPLAY")
    if not display:
        return False, ("no display ($DISPLAY and $WAYLAND_DISPLAY are unset)" if not wayland
                       else f"WAYLAND_DISPLAY={wayland} but no compositor answers there")
    host, _, rest = display.rpartition(":")
    number = rest.split(".")[0]
    if not number.isdigit():
        return False, f"DISPLAY={display} is not of the form [HOST]:N"
    n = int(number)
    if host in ("", "unix"):  # Xorg listens on an abstract socket and on /tmp/.X11-unix/X<n>
        found = any(_connects(socket.AF_UNIX, a, timeout) for a in (f"\0/tmp/.X11-unix/X{n}", f"/tmp/.X11-unix/X{n}"))
    elif host.startswith("/"):  # a socket path (XQuartz)
        found = _connects(socket.AF_UNIX, display, timeout)
    else:
        found = _connects(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET,
                          (host.strip("[]"), 6000 + n), timeout)
    if found:
        return True, f"X server {display}"
    return False, f"DISPLAY={display} but no X server answers there"


def display_available() -> bool:
    return display_check()[0]


def facts() -> dict[str, Any]:
    """Everything a benchmark report should carry about the machine it ran on."""
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(), "board": board_model(),
        "governor": governor(), "mhz": cpu_mhz(), "temperature_c": temperature_c(), "throttled": throttled(),
        "os": platform.platform(), "python": sys.version.split()[0],
        "numpy": package_version("numpy"), "opencv": package_version("opencv-python-headless")
        or package_version("opencv-python"), "ai_edge_litert": package_version("ai-edge-litert"),
        "tflite_runtime": package_version("tflite-runtime"),
    }
