//! Backup, schedule (pure): when a Backup runs. A schedule is a standard five-field cron expression
//! (minute hour day-of-month month day-of-week) in UTC, or one of `@hourly`, `@daily` (`@midnight`),
//! `@weekly`, `@monthly`, `@yearly` (`@annually`). Also here: the default schedules, spread per
//! installation, whether a run is due, and the clock the controller reads (a manual one in tests).
//!
//! The syntax is checked here, field by field, so that a mistake is named exactly ("minute field `61`
//! is out of range 0-59"); the `croner` crate then finds the times. Only the portable syntax is
//! accepted: numbers, month and day names, `*`, ranges `a-b`, steps `*/n` and `a-b/n`, and lists.
//! croner's extensions (`L`, `W`, `#`, `?`, a leading `+`) are refused, so an expression means the same
//! to anyone who knows cron. Day-of-week 0 and 7 are both Sunday. When day-of-month and day-of-week are
//! both restricted, a day matches if either does (as in Vixie cron); a field counts as unrestricted
//! only when it is exactly `*`. An expression that can never fire (`0 0 30 2 *`) is refused.
//!
//! Everything is UTC: there is no daylight saving time, so every day has each hour exactly once and a
//! schedule never fires twice or skips a run around a clock change.

use chrono::{DateTime, Duration, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::{Arc, Mutex};

/// A parsed schedule. `Display` shows the expression as written (trimmed).
#[derive(Debug, Clone)]
pub struct Schedule {
    expression: String,
    cron: Cron,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.expression == other.expression
    }
}

impl Eq for Schedule {}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expression)
    }
}

impl Schedule {
    /// Parses a cron expression; the error names the field and what is wrong with it.
    pub fn parse(expr: &str) -> Result<Schedule, String> {
        let expression = expr.trim();
        let five = berth_api_types::cron::check(expression)?;
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(&five)
            // Not expected after the checks above; kept so a disagreement is an error, not a panic.
            .map_err(|e| format!("`{expression}` is not a valid schedule: {e}"))?;
        Ok(Schedule {
            expression: expression.to_string(),
            cron,
        })
    }

    /// The first scheduled time strictly after `t` (`None` only past the year 5000).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t, false).ok()
    }

    /// The last scheduled time at or before `t`.
    fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&t, true).ok()
    }
}

/// The default backup schedule of an installation: hourly, at a minute taken from a hash of the
/// installation id. Many installations back up to shared storage (one S3 bucket, one NAS); if all
/// ran at :00 they would all hit it at once, every hour. The hash spreads them over the hour, and it
/// is stable (the same id gives the same minute on every node, after every restart and upgrade), so a
/// schedule does not move by itself.
pub fn default_expression(installation_id: &str) -> String {
    format!("{} * * * *", spread_minute(installation_id))
}

/// The default schedule of the nightly verification (`restic check`): once a day in the 03:00 UTC
/// hour, a fixed time operators can expect, at the backup minute + 30, as far as possible from the
/// hourly backup of the same installation so the two rarely overlap (the controller must still run
/// them one at a time) and, like the backup, spread over the hour across installations.
pub fn default_verify_expression(installation_id: &str) -> String {
    format!("{} 3 * * *", (spread_minute(installation_id) + 30) % 60)
}

/// 0..=59 from SHA-256 of the id. The prefix keeps this use of the hash apart from any other.
fn spread_minute(installation_id: &str) -> u64 {
    let digest = Sha256::digest(format!("berth backup schedule\n{installation_id}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) % 60
}

/// The time the controller goes by. The controller takes a `Clock` so tests can drive it by hand.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> DateTime<Utc> {
        (**self).now()
    }
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to, for tests. Clones share one time, so a test can keep one
/// and hand another to the controller.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            now: Arc::new(Mutex::new(start)),
        }
    }

    pub fn set(&self, t: DateTime<Utc>) {
        *self.lock() = t;
    }

    /// Moves the clock by `by` (backwards if negative) and returns the new time.
    pub fn advance(&self, by: Duration) -> DateTime<Utc> {
        let mut now = self.lock();
        *now += by;
        *now
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DateTime<Utc>> {
        // The value is a plain time: a panic elsewhere cannot leave it half-written.
        self.now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.lock()
    }
}

/// The scheduled time of the run that is due at `now`, if one is.
///
/// Runs are due for scheduled times strictly after `last_run` (the scheduled time of the last run,
/// as returned here) or, before the first run, strictly after `created` (a schedule does not fire
/// for times before the Backup existed); a `last_run` before `created` counts as `created`.
/// Missed runs collapse into one: after an outage, only the latest scheduled time at or before
/// `now` is returned, so the controller makes one backup, not one per missed hour, and recording
/// that time as `last_run` makes the next one due at the next scheduled time. If the clock went
/// back before `last_run`, nothing is due until it passes the next scheduled time after it.
pub fn due(
    schedule: &Schedule,
    last_run: Option<DateTime<Utc>>,
    created: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let since = last_run.map_or(created, |last| last.max(created));
    let first = schedule.next_after(since)?;
    if first > now {
        return None;
    }
    let latest = schedule.last_at_or_before(now).unwrap_or(first);
    Some(latest.max(first))
}

/// The next scheduled time strictly after `now`: when to look again, and what `berth backup list`
/// shows as the next run.
pub fn next_run(schedule: &Schedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    schedule.next_after(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Timelike;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .with_timezone(&Utc)
    }

    fn next(expr: &str, after: &str) -> String {
        let schedule = Schedule::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        schedule
            .next_after(t(after))
            .map(|n| n.to_rfc3339())
            .unwrap_or_default()
    }

    #[test]
    fn valid_expressions_parse_and_display_as_written() {
        for expr in [
            "17 * * * *",
            "0 3 * * *",
            "*/15 1-5 1,15 JAN-MAR,dec sun",
            "0-30/10 */2 * * MON-FRI",
            "0 0 * * 7",
            "59 23 31 12 6",
            "*/90 * * * *",
            "@hourly",
            "@DAILY",
            "@midnight",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
        ] {
            let schedule = Schedule::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
            assert_eq!(schedule.to_string(), expr);
        }
        assert_eq!(
            Schedule::parse("  5 * * * *\n").unwrap().to_string(),
            "5 * * * *"
        );
    }

    #[test]
    fn bad_expressions_are_named_exactly() {
        let shape = "5 fields, minute hour day-of-month month day-of-week (UTC), or one of \
                     @hourly, @daily, @weekly, @monthly, @yearly";
        let cases = [
            ("61 * * * *", "minute field `61` is out of range 0-59".to_string()),
            ("0 24 * * *", "hour field `24` is out of range 0-23".to_string()),
            ("0 0 0 * *", "day-of-month field `0` is out of range 1-31".to_string()),
            ("0 0 32 * *", "day-of-month field `32` is out of range 1-31".to_string()),
            ("0 0 * 13 *", "month field `13` is out of range 1-12".to_string()),
            ("0 0 * * 8", "day-of-week field `8` is out of range 0-7".to_string()),
            ("0-61 * * * *", "minute field `0-61`: `61` is out of range 0-59".to_string()),
            ("1,99 * * * *", "minute field `1,99`: `99` is out of range 0-59".to_string()),
            (
                "99999999999 * * * *",
                "minute field `99999999999` is out of range 0-59".to_string(),
            ),
            ("x * * * *", "minute field `x` is not a number".to_string()),
            ("0 -1 * * *", "hour field `-1` needs a value on each side of `-`".to_string()),
            ("0 1- * * *", "hour field `1-` needs a value on each side of `-`".to_string()),
            (
                "0 0 * FOO *",
                "month field `FOO` is not a number or a month name (JAN-DEC)".to_string(),
            ),
            (
                "0 0 * * monday",
                "day-of-week field `monday` is not a number or a day name (SUN-SAT)".to_string(),
            ),
            ("0 0 L * *", "day-of-month field `L` is not a number".to_string()),
            (
                "0 0 * * 5#3",
                "day-of-week field `5#3` is not a number or a day name (SUN-SAT)".to_string(),
            ),
            ("0 0 ? * 1", "day-of-month field `?` is not a number".to_string()),
            (
                "5-2 * * * *",
                "minute field `5-2` runs backwards; wrap-around ranges are not supported".to_string(),
            ),
            (
                "0 0 * * FRI-MON",
                "day-of-week field `FRI-MON` runs backwards; wrap-around ranges are not supported"
                    .to_string(),
            ),
            ("*/0 * * * *", "minute field `*/0` has step 0; a step is at least 1".to_string()),
            ("*/x * * * *", "minute field `*/x` has step `x`, which is not a number".to_string()),
            ("1,*/ * * * *", "minute field `1,*/`: `*/` has step ``, which is not a number".to_string()),
            (
                "5/10 * * * *",
                "minute field `5/10` steps from a single value; a step needs `*` or a range before \
                 it, e.g. `*/10` or `5-59/10`"
                    .to_string(),
            ),
            ("1,,2 * * * *", "minute field `1,,2` has an empty list item".to_string()),
            ("", format!("the schedule is empty; expected {shape}")),
            ("   ", format!("the schedule is empty; expected {shape}")),
            ("0 0 * * * *", format!("`0 0 * * * *` has 6 field(s); expected {shape}")),
            ("0 0 * *", format!("`0 0 * *` has 4 field(s); expected {shape}")),
            ("@reboot", format!("unknown shortcut `@reboot`; expected {shape}")),
            (
                "0 0 30 2 *",
                "`0 0 30 2 *` never fires: no month it names has the day of the month it names"
                    .to_string(),
            ),
            (
                "0 0 31 4,6,9,11 *",
                "`0 0 31 4,6,9,11 *` never fires: no month it names has the day of the month it names"
                    .to_string(),
            ),
        ];
        for (expr, message) in cases {
            assert_eq!(Schedule::parse(expr).unwrap_err(), message, "{expr:?}");
        }
        // A restricted day-of-week makes 30 February fire on Mondays (either field matches).
        assert_eq!(
            next("0 0 30 2 1", "2024-01-31T00:00:00Z"),
            "2024-02-05T00:00:00+00:00"
        );
        // 29 February exists, every four years.
        assert_eq!(
            next("0 0 29 2 *", "2021-03-01T00:00:00Z"),
            "2024-02-29T00:00:00+00:00"
        );
    }

    #[test]
    fn next_after_is_strictly_after() {
        // At a scheduled time: the next one, not the same.
        assert_eq!(
            next("17 * * * *", "2024-01-31T10:17:00Z"),
            "2024-01-31T11:17:00+00:00"
        );
        assert_eq!(
            next("17 * * * *", "2024-01-31T10:16:59Z"),
            "2024-01-31T10:17:00+00:00"
        );
        // Seconds and fractions of a second before or after a scheduled minute.
        assert_eq!(
            next("17 * * * *", "2024-01-31T10:16:59.999Z"),
            "2024-01-31T10:17:00+00:00"
        );
        assert_eq!(
            next("17 * * * *", "2024-01-31T10:17:00.001Z"),
            "2024-01-31T11:17:00+00:00"
        );
        assert_eq!(
            next("@hourly", "2024-01-31T23:30:00Z"),
            "2024-02-01T00:00:00+00:00"
        );
        assert_eq!(
            next("@daily", "2024-01-31T00:00:00Z"),
            "2024-02-01T00:00:00+00:00"
        );
        assert_eq!(
            next("@weekly", "2024-01-31T00:00:00Z"),
            "2024-02-04T00:00:00+00:00"
        );
        assert_eq!(
            next("0 0 * * 7", "2024-01-31T00:00:00Z"),
            "2024-02-04T00:00:00+00:00"
        );
        assert_eq!(
            next("0 9 * * MON-FRI", "2024-02-02T09:00:00Z"),
            "2024-02-05T09:00:00+00:00"
        );
    }

    #[test]
    fn month_and_year_ends() {
        // The 31st skips the shorter months; the 30th skips February, even in a leap year.
        assert_eq!(
            next("0 0 31 * *", "2024-01-31T00:00:00Z"),
            "2024-03-31T00:00:00+00:00"
        );
        assert_eq!(
            next("0 0 31 * *", "2024-03-31T00:00:00Z"),
            "2024-05-31T00:00:00+00:00"
        );
        assert_eq!(
            next("0 0 30 * *", "2024-01-30T00:00:00Z"),
            "2024-03-30T00:00:00+00:00"
        );
        // End of February, leap and not.
        assert_eq!(
            next("@daily", "2024-02-28T00:00:00Z"),
            "2024-02-29T00:00:00+00:00"
        );
        assert_eq!(
            next("@daily", "2024-02-29T00:00:00Z"),
            "2024-03-01T00:00:00+00:00"
        );
        assert_eq!(
            next("@daily", "2023-02-28T00:00:00Z"),
            "2023-03-01T00:00:00+00:00"
        );
        assert_eq!(
            next("@monthly", "2024-02-15T00:00:00Z"),
            "2024-03-01T00:00:00+00:00"
        );
        // Across the year.
        assert_eq!(
            next("@yearly", "2019-12-31T23:59:59Z"),
            "2020-01-01T00:00:00+00:00"
        );
        assert_eq!(
            next("59 23 31 12 *", "2019-12-31T23:59:00Z"),
            "2020-12-31T23:59:00+00:00"
        );
        assert_eq!(
            next("17 * * * *", "2019-12-31T23:17:00Z"),
            "2020-01-01T00:17:00+00:00"
        );
    }

    #[test]
    fn utc_has_no_daylight_saving_time() {
        // Europe and the US change their clocks on these dates; a UTC schedule does not notice.
        let daily = Schedule::parse("30 2 * * *").unwrap();
        let mut at = t("2024-01-01T02:30:00Z");
        for _ in 0..366 {
            let n = daily.next_after(at).unwrap();
            assert_eq!(n - at, Duration::hours(24), "after {at}");
            at = n;
        }
        assert_eq!(at, t("2025-01-01T02:30:00Z"));
        let hourly = Schedule::parse("@hourly").unwrap();
        for start in [
            "2024-03-31T00:00:00Z",
            "2024-10-27T00:00:00Z",
            "2024-03-10T05:00:00Z",
        ] {
            let mut at = t(start);
            for _ in 0..6 {
                let n = hourly.next_after(at).unwrap();
                assert_eq!(n - at, Duration::hours(1), "after {at}");
                at = n;
            }
        }
    }

    #[test]
    fn default_expressions_are_stable_and_spread() {
        // Pinned: changing the hash would move every installation's backups.
        assert_eq!(default_expression(""), "36 * * * *");
        assert_eq!(default_expression("a"), "51 * * * *");
        assert_eq!(default_expression("installation-1"), "52 * * * *");
        assert_eq!(default_expression("sim-32"), "17 * * * *");
        assert_eq!(default_verify_expression(""), "6 3 * * *");
        assert_eq!(default_verify_expression("installation-1"), "22 3 * * *");
        assert_eq!(default_verify_expression("sim-32"), "47 3 * * *");

        let mut per_minute = [0u32; 60];
        for n in 0..1200 {
            let id = format!("installation-{n}");
            let backup = Schedule::parse(&default_expression(&id)).unwrap();
            let verify = Schedule::parse(&default_verify_expression(&id)).unwrap();
            // Just before midnight, so that minute 0 counts as 00:00.
            let start = t("2023-12-31T23:59:59Z");
            let backup_at = backup.next_after(start).unwrap();
            assert_eq!(backup_at.format("%H").to_string(), "00");
            let minute = backup_at.minute();
            per_minute[minute as usize] += 1;
            // The verification is at 03:xx, half an hour away from the backup minute.
            let check = verify.next_after(start).unwrap();
            assert_eq!(check.format("%H").to_string(), "03");
            assert_eq!((check.minute() + 60 - minute) % 60, 30, "{id}");
        }
        // 20 per minute on average; every minute is used and none gets a crowd.
        assert!(
            per_minute.iter().all(|&n| (5..=40).contains(&n)),
            "{per_minute:?}"
        );
    }

    #[test]
    fn manual_clock_is_shared_and_moves_only_when_told() {
        let clock = ManualClock::new(t("2024-01-01T00:00:00Z"));
        let shared: Arc<dyn Clock> = Arc::new(clock.clone());
        assert_eq!(shared.now(), t("2024-01-01T00:00:00Z"));
        assert_eq!(
            clock.advance(Duration::minutes(90)),
            t("2024-01-01T01:30:00Z")
        );
        assert_eq!(shared.now(), t("2024-01-01T01:30:00Z"));
        clock.set(t("2023-12-31T23:00:00Z"));
        assert_eq!(shared.now(), t("2023-12-31T23:00:00Z"));
        assert_eq!(
            clock.advance(Duration::hours(-1)),
            t("2023-12-31T22:00:00Z")
        );

        let before = Utc::now();
        let now = SystemClock.now();
        assert!(before <= now && now <= Utc::now());
    }

    #[test]
    fn due_and_next_run() {
        let schedule = Schedule::parse("17 * * * *").unwrap();
        let created = t("2024-01-31T10:17:00Z");
        // Created exactly at a scheduled time: that time is not a run.
        assert_eq!(due(&schedule, None, created, created), None);
        assert_eq!(
            next_run(&schedule, created),
            Some(t("2024-01-31T11:17:00Z"))
        );
        assert_eq!(
            due(&schedule, None, created, t("2024-01-31T11:16:59Z")),
            None
        );
        // Due at the scheduled time, and still the same run while it has not been made.
        let first = Some(t("2024-01-31T11:17:00Z"));
        assert_eq!(
            due(&schedule, None, created, t("2024-01-31T11:17:00Z")),
            first
        );
        assert_eq!(
            due(&schedule, None, created, t("2024-01-31T12:16:59Z")),
            first
        );
        // Once made, nothing until the next scheduled time.
        assert_eq!(
            due(&schedule, first, created, t("2024-01-31T11:17:00Z")),
            None
        );
        assert_eq!(
            due(&schedule, first, created, t("2024-01-31T12:16:59Z")),
            None
        );
        assert_eq!(
            due(&schedule, first, created, t("2024-01-31T12:17:00Z")),
            Some(t("2024-01-31T12:17:00Z"))
        );
        // Five hours down: one run, for the latest scheduled time.
        assert_eq!(
            due(&schedule, first, created, t("2024-01-31T16:40:00Z")),
            Some(t("2024-01-31T16:17:00Z"))
        );
        // Days down, across a month end.
        assert_eq!(
            due(&schedule, first, created, t("2024-02-03T00:05:00Z")),
            Some(t("2024-02-02T23:17:00Z"))
        );
        // The clock went back before the last run: nothing is due.
        assert_eq!(
            due(&schedule, first, created, t("2024-01-31T09:00:00Z")),
            None
        );
        // A last run from before the Backup existed (an old object of the same name) counts as
        // its creation.
        let old = Some(t("2024-01-01T00:00:00Z"));
        assert_eq!(
            due(&schedule, old, created, t("2024-01-31T11:00:00Z")),
            None
        );
        assert_eq!(
            due(&schedule, old, created, t("2024-01-31T11:20:00Z")),
            first
        );
        // The first run of a daily schedule created mid-day is the next day's.
        let daily = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(due(&daily, None, created, t("2024-01-31T23:59:59Z")), None);
        assert_eq!(
            due(&daily, None, created, t("2024-02-01T03:00:00Z")),
            Some(t("2024-02-01T03:00:00Z"))
        );
        assert_eq!(
            next_run(&daily, t("2024-02-01T03:00:00Z")),
            Some(t("2024-02-02T03:00:00Z"))
        );
    }
}
