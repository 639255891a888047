"""Body-weight SUV: the per-patient factor that turns PET activity (Bq/mL) into SUV.

    SUVbw = C * weight / dose_at_scan                         (unitless, tissue at 1 g/mL)
    dose_at_scan = dose * exp(-ln(2) * delay / half_life)      (decay to the scan start)

with C the activity concentration of a voxel in Bq/mL, weight the body weight in g
(= 1000 * `weight_kg`), dose the injected activity in Bq measured at injection time, delay
the time from injection to the start of the acquisition in s, and half_life the tracer's
half-life in s (F-18: 6586.2 s, 109.77 min). PET images are stored decay-corrected to the
acquisition start (DICOM Decay Correction START), so the dose is decayed to that moment.
This is the definition of the Quantitative Imaging Biomarkers Alliance (QIBA FDG-PET/CT
profile) and of the DICOM SUV computation (PS3.3, C.8.9.1; Kinahan & Fletcher, 2010).

Inputs outside human and clinical ranges are refused rather than turned into a factor off
by orders of magnitude (`PLAUSIBLE`): a weight in g or a dose in MBq or mCi, and a delay
of more than `MAX_DELAY_HALF_LIVES` half-lives (a wrong date, or an acquisition time of
day before the injection's, which `delay_seconds` reads as the next day).

Example:
>>> round(suv_bw_factor(weight_kg=70.0, injected_dose_bq=3.7e8, delay_s=3600.0), 8)
0.00027634
"""

import datetime
import math
import re

F18_HALF_LIFE_S = 6586.2
"""Half-life of fluorine-18 in seconds (109.77 min), the default tracer."""

PLAUSIBLE = {"weight_kg": (0.3, 500.0), "injected_dose_bq": (1e6, 2e10), "half_life_s": (60.0, 1e7)}
"""`(low, high)` accepted per input: a body of 0.3-500 kg, an activity of 1 MBq-20 GBq (a
dose in MBq or mCi falls below), a half-life of 1 min (O-15: 122 s) to 115 days."""

MAX_DELAY_HALF_LIVES = 5.0
"""Longest accepted delay from injection to acquisition, in half-lives of the tracer (the
dose then down to 3%; FDG's late scans are at about 1.6, Zr-89's day-7 scans at 2.1)."""


class SUVInputError(ValueError):
    """An SUV input out of its range; `field` is its manifest column."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def suv_bw_factor(weight_kg: float, injected_dose_bq: float, delay_s: float = 0.0,
                  half_life_s: float = F18_HALF_LIFE_S) -> float:
    """The factor that multiplies a PET voxel (Bq/mL) to give its body-weight SUV.

    Args:
        weight_kg: body weight in kg (> 0).
        injected_dose_bq: injected activity in Bq at injection time (> 0).
        delay_s: seconds from injection to the acquisition start (>= 0); 0 when the dose
            is already decay-corrected to the acquisition start.
        half_life_s: the tracer's half-life in s (default F-18, 6586.2 s).

    Returns:
        `weight_g / (dose * exp(-ln 2 * delay_s / half_life_s))` in mL/Bq (g/Bq at 1 g/mL).

    Raises:
        SUVInputError: a value outside `PLAUSIBLE`, a negative delay or one longer than
            `MAX_DELAY_HALF_LIVES` half-lives (the message and `field` name it).

    Example:
    >>> suv_bw_factor(weight_kg=70.0, injected_dose_bq=370.0)  # the dose in MBq
    Traceback (most recent call last):
    ...
    unicon_tf.data.suv.SUVInputError: injected_dose_bq must lie in [1e+06, 2e+10], got 370.0 (in MBq or mCi? give Bq)
    """
    units = {"weight_kg": " (in g or lb? give kg)", "injected_dose_bq": " (in MBq or mCi? give Bq)"}
    for name, value in (("weight_kg", weight_kg), ("injected_dose_bq", injected_dose_bq),
                        ("half_life_s", half_life_s)):
        low, high = PLAUSIBLE[name]
        if not (math.isfinite(value) and low <= value <= high):
            hint = units.get(name, "") if math.isfinite(value) and value > 0 else ""
            raise SUVInputError(f"{name} must lie in [{low:g}, {high:g}], got {value}{hint}", name)
    if not (math.isfinite(delay_s) and 0 <= delay_s <= MAX_DELAY_HALF_LIVES * half_life_s):
        raise SUVInputError(
            f"the delay from injection to acquisition, {delay_s:g} s ({delay_s / 3600:.1f} h), is not within "
            f"0 to {MAX_DELAY_HALF_LIVES:g} half-lives ({MAX_DELAY_HALF_LIVES * half_life_s / 3600:.1f} h): a wrong "
            "date, or an acquisition before the injection (times of day are read as the next day)?", "scan_delay_s")
    dose_at_scan = injected_dose_bq * math.exp(-math.log(2.0) * delay_s / half_life_s)
    return weight_kg * 1000.0 / dose_at_scan


def delay_seconds(injection: str, acquisition: str, half_life_s: float | None = None) -> float:
    """Seconds from `injection` to `acquisition`, each a date-time or a time of day.

    Times of day tell the delay only modulo a day: with `half_life_s` given, they are
    refused for a tracer whose plausible delay (`MAX_DELAY_HALF_LIVES` half-lives) exceeds
    a day (Zr-89, I-124, Cu-64: the scan may be days after the injection).

    Date-times are ISO 8601 (`2024-03-01T09:30:00[+01:00]`) or DICOM DT
    (`YYYYMMDDHHMMSS[.ffffff][&ZZXX]`, e.g. RadiopharmaceuticalStartDateTime, PS3.5 6.2);
    times of day are `HH:MM[:SS[.ffffff]]` or DICOM TM (`HHMMSS[.ffffff]`); when both are
    times of day and the acquisition's is earlier, the scan is taken to be on the next
    day. A date-time and a time of day cannot be mixed.

    Example:
    >>> delay_seconds("09:30", "103000"), delay_seconds("2024-03-01T23:50:00", "2024-03-02T00:50:00")
    (3600.0, 3600.0)
    >>> delay_seconds("20240301093000", "20240301103000.5")
    3600.5

    Raises:
        ValueError: a value that is neither form, a mix of both, or times of day for a
            long-lived tracer.
    """
    first, second = _moment(injection), _moment(acquisition)
    if isinstance(first, datetime.datetime) != isinstance(second, datetime.datetime):
        raise ValueError(f"injection '{injection}' and acquisition '{acquisition}' must both be date-times "
                         "or both times of day")
    if isinstance(first, datetime.datetime):
        if (first.tzinfo is None) != (second.tzinfo is None):
            raise ValueError(f"'{injection}' and '{acquisition}': give a time zone on both or neither")
        return (second - first).total_seconds()
    if half_life_s is not None and MAX_DELAY_HALF_LIVES * half_life_s > 86400.0:
        raise ValueError(f"'{injection}' and '{acquisition}' are times of day, which cannot tell on which day of "
                         f"the {MAX_DELAY_HALF_LIVES * half_life_s / 86400:.1f} days a tracer of half-life "
                         f"{half_life_s / 3600:.1f} h may be scanned after its injection: give both as date-times")
    return (second - first) % 86400.0


DICOM_DATE_TIME = re.compile(r"(\d{14})(\.\d{1,6})?([+-]\d{4})?")
"""DICOM DT at second precision or finer: YYYYMMDDHHMMSS, fraction, UTC offset &ZZXX."""


def _moment(text):
    text = str(text).strip()
    dicom = DICOM_DATE_TIME.fullmatch(text)
    if dicom:
        whole, fraction, offset = dicom.groups()
        try:
            return datetime.datetime.strptime(whole + (fraction or ".0") + (offset or ""),
                                              "%Y%m%d%H%M%S.%f" + ("%z" if offset else ""))
        except ValueError:
            pass
    if len(text) > 8 and ("-" in text[:10] or "T" in text):
        try:
            return datetime.datetime.fromisoformat(text)
        except ValueError:
            pass
    digits = text.replace(":", "")
    whole, _, fraction = digits.partition(".")
    if whole.isdigit() and len(whole) in (4, 6) and (":" in text or len(whole) == 6) and (not fraction or fraction.isdigit()):
        hours, minutes, seconds = int(whole[:2]), int(whole[2:4]), int(whole[4:6] or 0)
        if hours < 24 and minutes < 60 and seconds < 60:
            return hours * 3600.0 + minutes * 60.0 + seconds + float(f"0.{fraction or 0}")
    raise ValueError(f"'{text}' is neither a date-time (2024-03-01T09:30:00 or DICOM 20240301093000) nor a "
                     "time of day (09:30:00 or 093000)")
