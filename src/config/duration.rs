//! Durations written with units: "50us", "250ms", "5s", "10m", "1h", "0".

use std::time::Duration;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} needs a unit (us, ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 =
        num.parse().map_err(|_| format!("invalid duration {s:?} (use a whole number and a unit: us, ms, s, m, h)"))?;
    // Checked: "18446744073709551615h" must be an error, not an overflow panic.
    let secs_per_unit = match unit {
        "us" => return Ok(Duration::from_micros(n)),
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        _ => {
            return Err(format!("invalid duration unit {unit:?} in {s:?} (use us, ms, s, m, h)"));
        }
    };
    n.checked_mul(secs_per_unit).map(Duration::from_secs).ok_or_else(|| format!("duration {s:?} is too large"))
}

pub mod serde_duration {
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration string such as \"250ms\", \"5s\", \"10m\", \"1h\" or \"0\"")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
            super::parse_duration(s).map_err(E::custom)
        }

        // A bare `0` is unambiguous and people write it for "disabled"; any
        // other bare number is not (seconds? milliseconds?), so it needs a unit.
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
            if n == 0 {
                Ok(Duration::ZERO)
            } else {
                Err(E::custom(format!("a bare number is ambiguous; write a unit, e.g. \"{n}s\" or \"{n}ms\"")))
            }
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
            self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
        }
    }
}
