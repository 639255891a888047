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

Example:
>>> round(suv_bw_factor(weight_kg=70.0, injected_dose_bq=3.7e8, delay_s=3600.0), 8)
0.00027634
"""

import datetime
import math

F18_HALF_LIFE_S = 6586.2
"""Half-life of fluorine-18 in seconds (109.77 min), the default tracer."""


def suv_bw_factor(weight_kg, injected_dose_bq, delay_s=0.0, half_life_s=F18_HALF_LIFE_S):
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
        ValueError: a value out of its range (the message names it).
    """
    for name, value, low in (("weight_kg", weight_kg, 0), ("injected_dose_bq", injected_dose_bq, 0),
                             ("half_life_s", half_life_s, 0)):
        if not (math.isfinite(value) and value > low):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if not (math.isfinite(delay_s) and delay_s >= 0):
        raise ValueError(f"the delay from injection to acquisition must be >= 0 s, got {delay_s} s")
    dose_at_scan = injected_dose_bq * math.exp(-math.log(2.0) * delay_s / half_life_s)
    return weight_kg * 1000.0 / dose_at_scan


def delay_seconds(injection, acquisition):
    """Seconds from `injection` to `acquisition`, each an ISO 8601 date-time or a time of day.

    Times of day are `HH:MM[:SS[.ffffff]]` or DICOM's `HHMMSS[.ffffff]`; when both are
    times of day and the acquisition's is earlier, the scan is taken to be on the next
    day. A date-time and a time of day cannot be mixed.

    Example:
    >>> delay_seconds("09:30", "103000"), delay_seconds("2024-03-01T23:50:00", "2024-03-02T00:50:00")
    (3600.0, 3600.0)

    Raises:
        ValueError: a value that is neither form, or a mix of both.
    """
    first, second = _moment(injection), _moment(acquisition)
    if isinstance(first, datetime.datetime) != isinstance(second, datetime.datetime):
        raise ValueError(f"injection '{injection}' and acquisition '{acquisition}' must both be date-times "
                         "or both times of day")
    if isinstance(first, datetime.datetime):
        if (first.tzinfo is None) != (second.tzinfo is None):
            raise ValueError(f"'{injection}' and '{acquisition}': give a time zone on both or neither")
        return (second - first).total_seconds()
    return (second - first) % 86400.0


def _moment(text):
    text = str(text).strip()
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
    raise ValueError(f"'{text}' is neither an ISO 8601 date-time (2024-03-01T09:30:00) nor a time of day "
                     "(09:30:00 or 093000)")
