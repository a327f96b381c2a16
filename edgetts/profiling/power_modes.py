"""A Jetson's power mode as a calibration setting: set by the user's command, read back, set back.

``nvpmodel -m N`` sets a mode by its number and ``nvpmodel -q`` prints its name and number
(:func:`edgetts.telemetry.device.power_mode_query`).  edgetts does not call ``nvpmodel -m``
itself: setting a mode needs root, and boards differ (a container may reach the host's tool
another way), so ``edgetts calibrate --switch CMD`` runs the user's command with the mode put in
for ``{power_mode}`` and then reads the mode back; only a mode that reads back as asked is
measured.  :func:`set_back` returns the device to the mode it was in before the calibrations.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import time

from edgetts.profiling.directory import ProfileError
from edgetts.telemetry.device import power_mode_query

SWITCH_TIMEOUT_S = 120  # a power mode switch takes seconds; one that hangs must not hold the calibration
log = logging.getLogger("edgetts.profiling")


def switch_power_mode(mode: str, switch: str | None, then: str = "nothing measured") -> None:
    """Run the user's ``switch`` command for ``mode`` and read the mode back (``nvpmodel -q``): ``mode`` may
    be the mode's name or its number (``nvpmodel -m`` takes the number); what is recorded is its name.
    ``then`` ends each error: what a failure means where it happened."""
    if not switch:
        raise ProfileError("a power_mode setting needs --switch, the command that sets it (e.g. 'sudo nvpmodel -m "
                           "{power_mode}')")  # fmt: skip
    # The mode goes into the user's shell command quoted: it is one word to nvpmodel, never more commands.
    # No stdin: a command that asks (nvpmodel asks whether to reboot for some modes) fails instead of waiting.
    # (sudo asks for its password on the terminal, not on stdin, so it still can.)
    # Only {power_mode} is replaced: the command's other braces are the shell's (awk '{print}').
    proc = subprocess.Popen(switch.replace("{power_mode}", shlex.quote(mode)), shell=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=SWITCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # its children may hold its output open: not long
            proc.communicate(timeout=2)
        raise ProfileError(f"--switch for power_mode={mode} did not finish in {SWITCH_TIMEOUT_S} s: "
                           f"{then}") from None  # fmt: skip
    if proc.returncode != 0:
        why = (stderr or stdout).strip().splitlines()
        last = f": {why[-1]}" if why else ""
        raise ProfileError(f"--switch for power_mode={mode} failed (exit {proc.returncode}){last}: {then}")
    time.sleep(1)  # clocks settle after a mode change
    now = power_mode_query()
    if now is None:
        raise ProfileError(f"after --switch for power_mode={mode} the power mode cannot be read back (no Jetson "
                           f"here, or `nvpmodel -q` fails): {then}")  # fmt: skip
    if mode not in (now[0], str(now[1])):
        number = f" (mode {now[1]})" if now[1] is not None else ""
        raise ProfileError(f"after --switch the device reports power mode {now[0]!r}{number}, not {mode!r}: "
                           f"{then}")  # fmt: skip


def set_back(before: tuple, switch: str | None, say=print) -> None:
    """Set the device back to the mode ``before`` (``power_mode_query()``'s answer) where it is in another
    now; a failure is a warning (the calibrations are written), never an error."""
    if not switch or power_mode_query() == before:  # without a switch nothing changed the mode
        return
    mode = before[0] if before[1] is None else str(before[1])  # nvpmodel -m takes the number
    if "{power_mode}" not in switch:
        log.warning("the power mode was %s before; --switch has no {power_mode}, so it is not set back", mode)
        return
    try:
        switch_power_mode(mode, switch, then="the device stays in the calibration's last mode")
        say(f"power mode set back to {before[0]}" + (f" (mode {before[1]})" if before[1] is not None else ""))
    except ProfileError as e:
        log.warning("could not set the power mode back: %s", e)
