//! Time windows during which a rule applies (e.g. business hours), in a named time zone (so the
//! window follows daylight saving) or at a fixed UTC offset.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize};

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Day {
    Sun,
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
}

impl Day {
    fn index(self) -> u64 {
        self as u64
    }
}

/// Minutes since midnight, written `"HH:MM"` in policy files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct TimeOfDay(pub u32);

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_hhmm(&s).map(TimeOfDay).ok_or_else(|| {
            serde::de::Error::custom(format!("expected \"HH:MM\" (00:00-24:00), got {s:?}"))
        })
    }
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

/// A UTC offset, written `"+HH:MM"` / `"-HH:MM"` (default `"+00:00"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub(crate) struct UtcOffset(pub i64);

impl<'de> Deserialize<'de> for UtcOffset {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let err =
            || serde::de::Error::custom(format!("expected \"+HH:MM\" or \"-HH:MM\", got {s:?}"));
        let (sign, rest) = match s.as_bytes().first() {
            Some(b'+') => (1, &s[1..]),
            Some(b'-') => (-1, &s[1..]),
            _ => return Err(err()),
        };
        let minutes = parse_hhmm(rest).filter(|m| *m <= 14 * 60).ok_or_else(err)?;
        Ok(UtcOffset(sign * i64::from(minutes) * 60))
    }
}

/// An IANA time zone (`"Europe/Berlin"`), resolved from the host's time zone database when the
/// policy is loaded: an unknown name is a load error, never a window that silently uses UTC.
#[derive(Debug, Clone)]
pub(crate) struct TimeZoneName {
    name: String,
    zone: jiff::tz::TimeZone,
}

impl PartialEq for TimeZoneName {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for TimeZoneName {}

impl Serialize for TimeZoneName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

impl<'de> Deserialize<'de> for TimeZoneName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        let zone = jiff::tz::TimeZone::get(&name).map_err(|e| {
            serde::de::Error::custom(format!(
                "unknown time zone {name:?} ({e}); use an IANA name such as \"Europe/Berlin\""
            ))
        })?;
        Ok(TimeZoneName { name, zone })
    }
}

/// `[windows.NAME]` in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Window {
    /// Days on which the window opens (default: every day).
    #[serde(default)]
    pub days: Vec<Day>,
    /// Start, inclusive.
    pub from: TimeOfDay,
    /// End, exclusive. An end before the start spans midnight (the day is the start's).
    pub to: TimeOfDay,
    /// A fixed offset (`"+02:00"`), used when no `time_zone` is given.
    pub utc_offset: UtcOffset,
    /// A named zone; exclusive with `utc_offset`.
    pub time_zone: Option<TimeZoneName>,
}

/// What a policy file may write; `Window` is built from it so that the offset and the zone
/// cannot both be given.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowFile {
    #[serde(default)]
    days: Vec<Day>,
    from: TimeOfDay,
    to: TimeOfDay,
    utc_offset: Option<UtcOffset>,
    time_zone: Option<TimeZoneName>,
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = WindowFile::deserialize(d)?;
        if f.utc_offset.is_some() && f.time_zone.is_some() {
            return Err(serde::de::Error::custom(
                "give either `time_zone` or `utc_offset`, not both",
            ));
        }
        Ok(Window {
            days: f.days,
            from: f.from,
            to: f.to,
            utc_offset: f.utc_offset.unwrap_or_default(),
            time_zone: f.time_zone,
        })
    }
}

impl Window {
    /// True if `at` falls inside the window.
    pub(crate) fn contains(&self, at: SystemTime) -> bool {
        // A clock before 1970 is broken: treat the window as closed (fail closed).
        let Ok(since) = at.duration_since(UNIX_EPOCH) else {
            return false;
        };
        let offset = match &self.time_zone {
            Some(tz) => {
                let Ok(ts) = jiff::Timestamp::try_from(at) else {
                    return false;
                };
                i64::from(tz.zone.to_offset(ts).seconds())
            }
            None => self.utc_offset.0,
        };
        let local = since.as_secs() as i64 + offset;
        if local < 0 {
            return false;
        }
        let local = local as u64;
        let day_number = local / 86_400;
        let minute = ((local % 86_400) / 60) as u32;
        // 1970-01-01 was a Thursday (index 4 with Sunday = 0).
        let weekday = (day_number + 4) % 7;
        let (from, to) = (self.from.0, self.to.0);
        let (inside, start_day) = if from <= to {
            (minute >= from && minute < to, weekday)
        } else if minute >= from {
            (true, weekday)
        } else {
            (minute < to, (weekday + 6) % 7)
        };
        inside && (self.days.is_empty() || self.days.iter().any(|d| d.index() == start_day))
    }

    /// A window that can never be open (linted).
    pub(crate) fn is_empty(&self) -> bool {
        self.from == self.to
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn window(text: &str) -> Window {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn business_hours() {
        let w = window(
            "days = [\"mon\",\"tue\",\"wed\",\"thu\",\"fri\"]\nfrom = \"08:00\"\nto = \"18:00\"",
        );
        // 2026-11-23 is a Monday: 1_795_392_000 is 00:00 UTC that day.
        let monday = 1_795_392_000;
        assert!(w.contains(at(monday + 9 * 3600)));
        assert!(!w.contains(at(monday + 7 * 3600)));
        assert!(!w.contains(at(monday + 18 * 3600)));
        // Sunday 09:00.
        assert!(!w.contains(at(monday - 86_400 + 9 * 3600)));
    }

    #[test]
    fn offset_and_midnight() {
        let w = window("from = \"22:00\"\nto = \"02:00\"\nutc_offset = \"+02:00\"");
        let monday = 1_795_392_000;
        // 21:00 UTC = 23:00 local: inside.
        assert!(w.contains(at(monday + 21 * 3600)));
        // 01:00 UTC = 03:00 local: outside.
        assert!(!w.contains(at(monday + 3600)));
    }

    #[test]
    fn named_zone_follows_daylight_saving() {
        let w = window("from = \"09:00\"\nto = \"17:00\"\ntime_zone = \"Europe/Berlin\"");
        // 2026-07-01 (summer, UTC+2) and 2026-12-01 (winter, UTC+1), both 00:00 UTC.
        let summer = 1_782_864_000;
        let winter = 1_796_083_200;
        // 07:30 UTC is 09:30 in summer (open) but 08:30 in winter (closed).
        assert!(w.contains(at(summer + 7 * 3600 + 1800)));
        assert!(!w.contains(at(winter + 7 * 3600 + 1800)));
        // 15:30 UTC is 17:30 in summer (closed) but 16:30 in winter (open).
        assert!(!w.contains(at(summer + 15 * 3600 + 1800)));
        assert!(w.contains(at(winter + 15 * 3600 + 1800)));
    }

    #[test]
    fn unknown_zone_or_both_forms_are_rejected() {
        let e = toml::from_str::<Window>(
            "from = \"09:00\"\nto = \"17:00\"\ntime_zone = \"Mars/Olympus\"",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown time zone"), "{e}");
        assert!(
            toml::from_str::<Window>(
                "from = \"09:00\"\nto = \"17:00\"\ntime_zone = \"UTC\"\nutc_offset = \"+01:00\""
            )
            .is_err()
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(toml::from_str::<Window>("from = \"25:00\"\nto = \"02:00\"").is_err());
        assert!(toml::from_str::<Window>("from = \"8:00\"\nto = \"02:00\"").is_err());
        assert!(
            toml::from_str::<Window>("from = \"08:00\"\nto = \"02:00\"\nutc_offset = \"02:00\"")
                .is_err()
        );
    }
}
