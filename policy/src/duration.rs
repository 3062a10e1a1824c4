//! Policy durations: `500ms`, `1s`, `1m30s`, `2h`.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("is not a duration (use a number with ms, s, m or h, e.g. 1m30s)")]
pub struct DurationError;

pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return Err(DurationError);
    }
    let mut total: u64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(DurationError);
        }
        let number: u64 = text[start..i].parse().map_err(|_| DurationError)?;
        let unit_ms: u64 = if bytes[i..].starts_with(b"ms") {
            i += 2;
            1
        } else {
            let unit = match bytes.get(i) {
                Some(b's') => 1_000,
                Some(b'm') => 60_000,
                Some(b'h') => 3_600_000,
                _ => return Err(DurationError),
            };
            i += 1;
            unit
        };
        total = number
            .checked_mul(unit_ms)
            .and_then(|ms| total.checked_add(ms))
            .ok_or(DurationError)?;
    }
    Ok(Duration::from_millis(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(
            parse_duration("1h1m1s1ms"),
            Ok(Duration::from_millis(3_661_001))
        );
    }

    #[test]
    fn refuses_other_text() {
        for bad in [
            "",
            "5 parsecs",
            "1",
            "s",
            "1d",
            "-1s",
            "1.5s",
            "1S",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_duration(bad), Err(DurationError), "{bad}");
        }
    }
}
