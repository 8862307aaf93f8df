//! Human-written quantities in specs: durations (`10s`, `1m30s`), memory sizes (`256Mi`, `512m`) and
//! CPU counts (`0.5`, `500m`). Each parses when the manifest is read, so a bad value is reported with
//! its file, line and field, and keeps the user's spelling when printed back.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Longest duration accepted: what the engine's signed 64-bit nanoseconds hold (about 292 years).
/// Anything longer used to be cut to this silently, or (summed) to overflow.
pub const MAX_DURATION_NANOS: u64 = i64::MAX as u64;
const MAX_DURATION_TEXT: &str = "2562047h47m16.854775807s, about 292 years";

/// A Go-style duration, as Docker and Swarm users write them: `300ms`, `10s`, `1m30s`, `2h`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duration {
    text: String,
    nanos: u64,
}

impl Duration {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid duration `{s}`: expected e.g. `500ms`, `10s`, `1m30s`, `2h`");
        let t = s.trim();
        if t.is_empty() {
            return Err(bad());
        }
        if t == "0" {
            return Ok(Duration {
                text: s.to_string(),
                nanos: 0,
            });
        }
        let too_long = || format!("duration `{s}` is too long (at most {MAX_DURATION_TEXT})");
        let mut total: u64 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            if num_len == 0 {
                return Err(bad());
            }
            let number = &rest[..num_len];
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale: u64 = match &rest[..unit_len] {
                "ns" => 1,
                "us" | "µs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            // Whole numbers exactly (a float cannot hold `9223372036854775807ns`), fractions in
            // floating point; every step checked, so `2^127ns` twice is "too long" rather than
            // an overflow that wraps to 0.
            let part = if number.contains('.') {
                let value: f64 = number.parse().map_err(|_| bad())?;
                let nanos = (value * scale as f64).round();
                if !(nanos.is_finite() && nanos < MAX_DURATION_NANOS as f64) {
                    return Err(too_long());
                }
                nanos as u64
            } else {
                // Only digits here, so a number that does not parse is one too long for u128.
                let value: u128 = number.parse().map_err(|_| too_long())?;
                value
                    .checked_mul(u128::from(scale))
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(too_long)?
            };
            total = total
                .checked_add(part)
                .filter(|&n| n <= MAX_DURATION_NANOS)
                .ok_or_else(too_long)?;
        }
        let nanos = total;
        Ok(Duration {
            text: s.to_string(),
            nanos,
        })
    }

    pub fn as_nanos(&self) -> u64 {
        self.nanos
    }

    /// The duration in the largest unit that states it exactly (`1500ms`, `2s`, `90ns`), so
    /// that printing and parsing it again gives the same number of nanoseconds.
    pub fn from_nanos(nanos: u64) -> Self {
        let nanos = nanos.min(MAX_DURATION_NANOS);
        let text = [
            (3_600_000_000_000, "h"),
            (60_000_000_000, "m"),
            (1_000_000_000, "s"),
            (1_000_000, "ms"),
            (1_000, "us"),
        ]
        .into_iter()
        .find(|(unit, _)| nanos.is_multiple_of(*unit))
        .map_or_else(
            || format!("{nanos}ns"),
            |(unit, name)| format!("{}{name}", nanos / unit),
        );
        Duration { text, nanos }
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(de::Error::custom)
    }
}

/// A size in bytes. Suffixes are binary, as in Docker (`512m` = 512 MiB) and Kubernetes (`512Mi`):
/// `k`/`Ki`, `m`/`Mi`, `g`/`Gi`, `t`/`Ti`, with an optional trailing `b`. A bare number is bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteSize {
    text: String,
    bytes: i64,
}

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid size `{s}`: expected bytes or a number with k, m, g, t (binary: 512m = 512Mi = 512 MiB)")
        };
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num.parse().map_err(|_| bad())?;
        let unit = unit.to_ascii_lowercase();
        let unit = unit.strip_suffix('b').unwrap_or(&unit);
        let unit = unit.strip_suffix('i').unwrap_or(unit);
        let scale: f64 = match unit {
            "" => 1.0,
            "k" => 1024.0,
            "m" => 1024.0 * 1024.0,
            "g" => 1024.0 * 1024.0 * 1024.0,
            "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad()),
        };
        let bytes = value * scale;
        if !(bytes.is_finite() && bytes >= 0.0 && bytes < i64::MAX as f64) {
            return Err(bad());
        }
        Ok(ByteSize {
            text: s.to_string(),
            bytes: bytes.round() as i64,
        })
    }

    pub fn bytes(&self) -> i64 {
        self.bytes
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrNum::deserialize(d)? {
            StrOrNum::Str(s) => ByteSize::parse(&s),
            StrOrNum::Num(n) => ByteSize::parse(&n.to_string()),
        }
        .map_err(de::Error::custom)
    }
}

/// A CPU count: `0.5`, `2`, or Kubernetes millicores `500m`. Stored as Swarm's nano-CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpus {
    text: String,
    nano: i64,
}

impl Cpus {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid CPU count `{s}`: expected e.g. `0.5`, `2` or `500m`");
        let t = s.trim();
        let cpus: f64 = match t.strip_suffix('m') {
            Some(milli) => milli.parse::<f64>().map_err(|_| bad())? / 1000.0,
            None => t.parse().map_err(|_| bad())?,
        };
        let nano = (cpus * 1e9).round();
        // `1e-12` is more than 0 but rounds to 0 nano-CPUs, which the engine reads as "no limit".
        if !(cpus.is_finite() && nano >= 1.0 && cpus <= 4096.0) {
            return Err(format!(
                "invalid CPU count `{s}`: must be at least 0.000000001 and at most 4096"
            ));
        }
        Ok(Cpus {
            text: s.to_string(),
            nano: nano as i64,
        })
    }

    pub fn nano_cpus(&self) -> i64 {
        self.nano
    }
}

impl fmt::Display for Cpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Cpus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrNum::deserialize(d)? {
            StrOrNum::Str(s) => Cpus::parse(&s),
            StrOrNum::Num(n) => Cpus::parse(&n.to_string()),
        }
        .map_err(de::Error::custom)
    }
}

/// The JSON Schema of a type written as a string (or, `numbers`, also a number) whose syntax only
/// the parser checks fully; `pattern` catches the obvious mistakes in an editor.
pub(crate) fn text_schema(description: &str, pattern: &str, numbers: bool) -> schemars::Schema {
    let string = schemars::json_schema!({"type": "string", "pattern": pattern});
    if numbers {
        schemars::json_schema!({
            "description": description,
            "anyOf": [string, {"type": "number", "minimum": 0}]
        })
    } else {
        schemars::json_schema!({"type": "string", "pattern": pattern, "description": description})
    }
}

impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        text_schema(
            "A duration: a number and a unit (`ns`, `us`, `ms`, `s`, `m`, `h`), repeated: `90s`, `1m30s`, `500ms`.",
            r"^\s*(0|([0-9.]+(ns|us|µs|ms|s|m|h))+)\s*$",
            false,
        )
    }
}

impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        text_schema(
            "A size in bytes; binary suffixes as Docker and Kubernetes: `512m`/`512Mi`, `1g`/`1Gi`, `k`, `t`; a bare number is bytes.",
            r"^\s*[0-9.]+\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$",
            true,
        )
    }
}

impl schemars::JsonSchema for Cpus {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Cpus".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        text_schema(
            "A CPU count: `0.5`, `2`, or millicores `500m`.",
            r"^\s*[0-9.]+m?\s*$",
            true,
        )
    }
}

/// YAML users write `cpus: 0.5` and `cpus: "0.5"` interchangeably.
#[derive(Deserialize)]
#[serde(untagged, expecting = "a string or a number")]
enum StrOrNum {
    Str(String),
    Num(serde_json::Number),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Duration::parse("10s").unwrap().as_nanos(), 10_000_000_000);
        assert_eq!(Duration::parse("1m30s").unwrap().as_nanos(), 90_000_000_000);
        assert_eq!(Duration::parse("500ms").unwrap().as_nanos(), 500_000_000);
        assert_eq!(
            Duration::parse("1.5h").unwrap().as_nanos(),
            5_400_000_000_000
        );
        assert_eq!(Duration::parse("0").unwrap().as_nanos(), 0);
        for bad in ["", "10", "s", "10x", "1m30", "-1s", "ten seconds"] {
            let e = Duration::parse(bad).unwrap_err();
            assert!(e.starts_with("invalid duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_never_overflow() {
        // Each part alone fits in u128; their sum used to wrap to 0 (release) or panic (debug).
        let huge = format!("{0}ns{0}ns", 1u128 << 127);
        let e = Duration::parse(&huge).unwrap_err();
        assert!(e.contains("is too long"), "{e}");
        for bad in [
            "2562048h",
            "9223372036854775808ns",
            "1e300h",
            "153722867m1h",
        ] {
            let e = Duration::parse(bad).unwrap_err();
            assert!(
                e.contains("too long") || e.starts_with("invalid"),
                "{bad}: {e}"
            );
        }
        // The longest accepted one is what the engine's i64 nanoseconds hold, exactly.
        let max = Duration::parse("9223372036854775807ns").unwrap();
        assert_eq!(max.as_nanos(), MAX_DURATION_NANOS);
        assert!(i64::try_from(max.as_nanos()).is_ok());
    }

    #[test]
    fn from_nanos_prints_what_parses_back() {
        for n in [
            0,
            1,
            999,
            1_000,
            1_500_000,
            2_000_000_000,
            90_000_000_000,
            7_200_000_000_000,
            MAX_DURATION_NANOS,
        ] {
            let d = Duration::from_nanos(n);
            assert_eq!(
                Duration::parse(&d.to_string()).unwrap().as_nanos(),
                n,
                "{d}"
            );
        }
        assert_eq!(Duration::from_nanos(1_500_000).to_string(), "1500us");
        assert_eq!(Duration::from_nanos(90_000_000_000).to_string(), "90s");
    }

    #[test]
    fn sizes_are_binary() {
        assert_eq!(ByteSize::parse("512").unwrap().bytes(), 512);
        assert_eq!(ByteSize::parse("64k").unwrap().bytes(), 65536);
        assert_eq!(ByteSize::parse("256m").unwrap().bytes(), 256 << 20);
        assert_eq!(ByteSize::parse("256Mi").unwrap().bytes(), 256 << 20);
        assert_eq!(ByteSize::parse("256MB").unwrap().bytes(), 256 << 20);
        assert_eq!(ByteSize::parse("1.5G").unwrap().bytes(), 3 << 29);
        for bad in ["", "m", "12q", "-5m", "1e400"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
        let n: ByteSize = serde_json::from_str("1048576").unwrap();
        assert_eq!(n.bytes(), 1 << 20);
    }

    #[test]
    fn cpus() {
        assert_eq!(Cpus::parse("0.5").unwrap().nano_cpus(), 500_000_000);
        assert_eq!(Cpus::parse("250m").unwrap().nano_cpus(), 250_000_000);
        assert_eq!(Cpus::parse("2").unwrap().nano_cpus(), 2_000_000_000);
        assert!(Cpus::parse("0").is_err());
        // More than 0, but 0 nano-CPUs: the engine would read it as no limit at all.
        assert!(Cpus::parse("1e-12").is_err());
        assert_eq!(Cpus::parse("1e-9").unwrap().nano_cpus(), 1);
        assert!(Cpus::parse("lots").is_err());
        let n: Cpus = serde_json::from_str("1.5").unwrap();
        assert_eq!(n.nano_cpus(), 1_500_000_000);
    }
}
