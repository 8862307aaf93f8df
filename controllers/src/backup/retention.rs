//! Backup, retention (pure): which snapshots of a Backup's restic repository to keep and which to
//! forget, given the policy, the snapshots and the time now. The controller runs it after every
//! backup and hands `Decision::forget` to `restic forget`; `berth backup list` shows the reasons.
//!
//! # The rules, exactly
//!
//! All buckets are UTC calendar buckets, counted back from `now`; local time plays no part, so there is
//! no daylight saving time to get wrong and every node agrees.
//!
//! - **Hourly** (`hourly` = H hours): every snapshot with `now - H h < time <= now` is kept, failed
//!   ones included. The lower edge is open: at `now` = 12:17 with H = 24, a snapshot of yesterday's
//!   12:17 is *not* in the window.
//! - **Daily** (`daily` = D): the D UTC days ending with today (today included); of each, the newest
//!   successful snapshot.
//! - **Weekly** (`weekly` = W): the W ISO weeks (Monday to Sunday) ending with the current one; of
//!   each, the newest successful snapshot. An ISO week can span a year boundary (2019-12-30 is in
//!   2020-W01), and it is one bucket.
//! - **Monthly** (`monthly` = M, `None` = forever): the M calendar months ending with the current one,
//!   or every month; of each, the newest successful snapshot.
//! - **Newest successful**: the newest successful snapshot is always kept, even when every newer run
//!   failed and even when the policy's windows would not keep it, so a repository never loses its
//!   last good restore point through retention.
//!
//! A snapshot is kept when any rule keeps it; `Decision::keep` lists every rule that does.
//!
//! # Edge cases
//!
//! - **Failed snapshots** (`ok == false`, a failed or partial run) never represent a day, week or
//!   month: a bucket's snapshot is its newest *successful* one. They are kept only while inside the
//!   hourly window, so an operator can look at what a failed run left, and forgotten after that.
//! - **Snapshots in the future** (`time > now`; a node's clock was ahead) are kept with
//!   [`Reason::InFuture`] and take no other part: they represent no bucket and are not the newest
//!   successful one, so a bogus date cannot displace a real restore point. Once `now` passes them they
//!   are ordinary snapshots.
//! - **Ties**: snapshots with the same time are ordered by id, the greater id counting as the newer,
//!   so the decision never depends on the order of the input.
//! - **Duplicate ids** are one snapshot: the one ordered first (newest) counts, the others are ignored
//!   (they appear neither in `keep` nor in `forget`, so the id is never forgotten by accident).
//!
//! # Stable over time
//!
//! A snapshot kept at a later `now` was also kept at every earlier `now` after it was taken (windows
//! only move forward, and a bucket's newest successful snapshot stays its newest). So pruning after
//! every run, as the controller does, keeps exactly what one `decide` over the full history would
//! keep; the simulation test in this module checks that over three months of hourly runs.

use chrono::{DateTime, Datelike, Duration, IsoWeek, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;

/// How many snapshots to keep. The default is the issue's: every snapshot of the last 24 hours, the
/// last of each day for 7 days, of each week for 4 weeks, of each month forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Policy {
    /// Keep every snapshot of the last this many hours.
    pub hourly: u32,
    /// Keep the last snapshot of each of the last this many UTC days (today included).
    pub daily: u32,
    /// Keep the last snapshot of each of the last this many ISO weeks (this week included).
    pub weekly: u32,
    /// Keep the last snapshot of each of the last this many months (this month included);
    /// `None` (the field left out) keeps one per month forever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u32>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            hourly: 24,
            daily: 7,
            weekly: 4,
            monthly: None,
        }
    }
}

impl Policy {
    /// Refuses a policy that keeps no history at all. Every window at zero would keep nothing but the
    /// newest successful snapshot: a backup without history is almost certainly a mistake (e.g.
    /// `monthly: 0` meant as "forever"), and retention deletes data, so it is refused rather than
    /// guessed. Keeping only the latest is still possible on purpose, with `hourly: 1`.
    /// (`decide` does not re-check: given such a policy it keeps the newest successful snapshot.)
    pub fn validate(&self) -> Result<(), String> {
        if self.hourly == 0 && self.daily == 0 && self.weekly == 0 && self.monthly == Some(0) {
            return Err(
                "retention keeps no history: hourly, daily, weekly and monthly are all 0, which would \
                 keep only the newest successful snapshot; set at least one of them (leave monthly out \
                 to keep one snapshot per month forever)"
                    .to_string(),
            );
        }
        Ok(())
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "all of the last {} h, last of each day for {} d, of each week for {} w, of each month ",
            self.hourly, self.daily, self.weekly
        )?;
        match self.monthly {
            None => write!(f, "forever"),
            Some(m) => write!(f, "for {m} mo"),
        }
    }
}

/// One snapshot in the repository, as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The restic snapshot id.
    pub id: String,
    /// When the snapshot was taken.
    pub time: DateTime<Utc>,
    /// False for the snapshot of a failed or partial run.
    pub ok: bool,
}

/// Why a snapshot is kept. Several can hold at once; `Display` is the text for `berth backup list`
/// and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Its time is after `now` (clock skew): kept, and otherwise ignored, until the clock passes it.
    InFuture,
    /// The newest successful snapshot, never forgotten.
    NewestSuccessful,
    /// Taken within the last `hours` hours.
    Hourly { hours: u32 },
    /// The newest successful snapshot of this UTC day.
    Daily(NaiveDate),
    /// The newest successful snapshot of this ISO week.
    Weekly(IsoWeek),
    /// The newest successful snapshot of this UTC month.
    Monthly { year: i32, month: u32 },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::InFuture => write!(f, "dated in the future (clock skew?)"),
            Reason::NewestSuccessful => write!(f, "newest successful"),
            Reason::Hourly { hours: 1 } => write!(f, "last hour"),
            Reason::Hourly { hours } => write!(f, "last {hours} hours"),
            Reason::Daily(day) => write!(f, "last of day {day}"),
            Reason::Weekly(week) => write!(f, "last of week {}-W{:02}", week.year(), week.week()),
            Reason::Monthly { year, month } => write!(f, "last of month {year}-{month:02}"),
        }
    }
}

/// Several reasons as one line of text, e.g. "newest successful, last 24 hours, last of day 2020-03-03".
pub fn render(reasons: &[Reason]) -> String {
    reasons
        .iter()
        .map(Reason::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What to keep, with why, and what to forget. Both lists are newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub keep: Vec<(String, Vec<Reason>)>,
    pub forget: Vec<String>,
}

/// Applies `policy` to `snapshots` at `now`; the rules are in the module documentation.
pub fn decide(policy: &Policy, snapshots: &[Candidate], now: DateTime<Utc>) -> Decision {
    // Newest first; equal times by id, the greater id first, so the input order never matters.
    let mut order: Vec<&Candidate> = snapshots.iter().collect();
    order.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
    let mut ids = HashSet::new();
    order.retain(|c| ids.insert(c.id.as_str()));

    // A window too large to subtract from `now` reaches back before any snapshot: no lower edge.
    let hourly_after = now.checked_sub_signed(Duration::hours(i64::from(policy.hourly)));
    let today = now.date_naive();
    let this_week = monday_of(today);
    let this_month = month_number(today);

    // Buckets already represented: iterating newest first, the first successful snapshot seen in a
    // bucket is its newest.
    let mut days = HashSet::new();
    let mut weeks = HashSet::new();
    let mut months = HashSet::new();
    let mut newest_ok_found = false;

    let mut decision = Decision::default();
    for c in order {
        let mut reasons = Vec::new();
        if c.time > now {
            reasons.push(Reason::InFuture);
        } else {
            if c.ok && !newest_ok_found {
                newest_ok_found = true;
                reasons.push(Reason::NewestSuccessful);
            }
            if hourly_after.is_none_or(|after| c.time > after) {
                reasons.push(Reason::Hourly {
                    hours: policy.hourly,
                });
            }
            if c.ok {
                let day = c.time.date_naive();
                if (today - day).num_days() < i64::from(policy.daily) && days.insert(day) {
                    reasons.push(Reason::Daily(day));
                }
                let week = monday_of(day);
                if (this_week - week).num_days() / 7 < i64::from(policy.weekly)
                    && weeks.insert(week)
                {
                    reasons.push(Reason::Weekly(day.iso_week()));
                }
                let month = month_number(day);
                let in_window = policy
                    .monthly
                    .is_none_or(|m| this_month - month < i64::from(m));
                if in_window && months.insert(month) {
                    reasons.push(Reason::Monthly {
                        year: day.year(),
                        month: day.month(),
                    });
                }
            }
        }
        if reasons.is_empty() {
            decision.forget.push(c.id.clone());
        } else {
            decision.keep.push((c.id.clone(), reasons));
        }
    }
    decision
}

/// The Monday that starts `day`'s ISO week: the week's key, which crosses year boundaries cleanly.
fn monday_of(day: NaiveDate) -> NaiveDate {
    day - Duration::days(i64::from(day.weekday().num_days_from_monday()))
}

/// Months since year 0, so that consecutive months differ by one across a year boundary.
fn month_number(day: NaiveDate) -> i64 {
    i64::from(day.year()) * 12 + i64::from(day.month0())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::schedule::{default_expression, due, Clock, ManualClock, Schedule};
    use std::collections::BTreeMap;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .with_timezone(&Utc)
    }

    fn snap(id: &str, time: &str, ok: bool) -> Candidate {
        Candidate {
            id: id.to_string(),
            time: t(time),
            ok,
        }
    }

    /// One line per kept snapshot: `id  reasons`, as in the golden file.
    fn lines(decision: &Decision) -> String {
        decision
            .keep
            .iter()
            .map(|(id, reasons)| format!("{id}  {}\n", render(reasons)))
            .collect()
    }

    fn kept(decision: &Decision) -> Vec<&str> {
        decision.keep.iter().map(|(id, _)| id.as_str()).collect()
    }

    // The golden history: a run every hour at :17 (the default schedule of installation `sim-32`)
    // from START to END, less the outages, with the failed runs and the hand-made snapshots below.
    // The expected decisions are in tests/data/retention/default-policy.txt, listed by hand.

    const START: &str = "2019-11-29T00:17:00Z";
    const END: &str = "2020-03-03T12:17:00Z";
    /// The controller was down: no run from the first to the second time, both included.
    const OUTAGES: [(&str, &str); 3] = [
        // A weekend: Sunday 15 December (end of 2019-W50) has no snapshot at all.
        ("2019-12-14T03:17:00Z", "2019-12-16T09:17:00Z"),
        // Across the end of January.
        ("2020-01-31T20:17:00Z", "2020-02-01T05:17:00Z"),
        // All of Sunday 1 March after midnight (end of 2020-W09).
        ("2020-03-01T00:17:00Z", "2020-03-01T23:17:00Z"),
    ];
    /// Runs that failed: their snapshot is partial.
    const FAILED: [&str; 11] = [
        "2020-01-05T23:17:00Z", // the last run of 2020-W01
        "2020-01-31T19:17:00Z", // the last run of January before the outage
        "2020-02-27T23:17:00Z", // the last run of a day
        "2020-03-02T13:17:00Z", // the oldest run still within 24 hours at END
        // Every run from 06:17 on the last day: the newest successful one is 05:17.
        "2020-03-03T06:17:00Z",
        "2020-03-03T07:17:00Z",
        "2020-03-03T08:17:00Z",
        "2020-03-03T09:17:00Z",
        "2020-03-03T10:17:00Z",
        "2020-03-03T11:17:00Z",
        "2020-03-03T12:17:00Z",
    ];
    /// Snapshots taken by hand (`berth backup run`), on either side of midnight: (time, ok).
    const MANUAL: [(&str, bool); 4] = [
        ("2019-12-31T23:59:59Z", true),
        ("2020-01-01T00:00:00Z", false),
        ("2020-02-29T23:59:59Z", true),
        ("2020-03-01T00:00:00Z", true),
    ];

    fn candidate(time: DateTime<Utc>, ok: bool) -> Candidate {
        let mut id = time.format("%Y-%m-%dT%H:%M:%S").to_string();
        if !ok {
            id.push_str("-failed");
        }
        Candidate { id, time, ok }
    }

    fn in_outage(time: DateTime<Utc>) -> bool {
        OUTAGES
            .iter()
            .any(|(from, to)| t(from) <= time && time <= t(to))
    }

    fn run_failed(time: DateTime<Utc>) -> bool {
        FAILED.iter().any(|f| t(f) == time)
    }

    fn history() -> Vec<Candidate> {
        let mut all = Vec::new();
        let mut time = t(START);
        while time <= t(END) {
            if !in_outage(time) {
                all.push(candidate(time, !run_failed(time)));
            }
            time += Duration::hours(1);
        }
        all.extend(MANUAL.iter().map(|(time, ok)| candidate(t(time), *ok)));
        all
    }

    /// The golden file: `now` -> the expected lines.
    fn golden() -> BTreeMap<DateTime<Utc>, String> {
        let text = include_str!("../../tests/data/retention/default-policy.txt");
        let mut sections = BTreeMap::new();
        let mut current: Option<DateTime<Utc>> = None;
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            if let Some(now) = line.strip_prefix("now ") {
                current = Some(t(now));
                sections.insert(t(now), String::new());
            } else {
                let now = current.expect("a `now` line before the first snapshot");
                let section = sections.get_mut(&now).expect("section");
                section.push_str(line);
                section.push('\n');
            }
        }
        sections
    }

    #[test]
    fn the_history_is_what_the_tables_say() {
        let all = history();
        // 2019-11-29T00:17 to 2020-03-03T12:17 is 95 days and 12 hours: 2293 hourly runs, less
        // 55 + 10 + 24 in the outages, plus 4 by hand.
        assert_eq!(all.len(), 2293 - 55 - 10 - 24 + 4);
        assert_eq!(all.iter().filter(|c| !c.ok).count(), FAILED.len() + 1);
        let ids: HashSet<_> = all.iter().map(|c| &c.id).collect();
        assert_eq!(ids.len(), all.len());
    }

    #[test]
    fn golden_default_policy_over_the_full_history() {
        let golden = golden();
        assert_eq!(golden.len(), 3);
        for (now, expected) in &golden {
            let upto: Vec<Candidate> = history().into_iter().filter(|c| c.time <= *now).collect();
            let decision = decide(&Policy::default(), &upto, *now);
            assert_eq!(lines(&decision), *expected, "at {now}");
            // Every snapshot is either kept or forgotten, once, and both lists are newest first.
            let mut all: Vec<&str> = kept(&decision);
            all.extend(decision.forget.iter().map(String::as_str));
            assert_eq!(all.len(), upto.len(), "at {now}");
            assert_eq!(all.iter().collect::<HashSet<_>>().len(), upto.len());
            let time = |id: &str| upto.iter().find(|c| c.id == id).map(|c| c.time);
            assert!(kept(&decision).windows(2).all(|w| time(w[0]) > time(w[1])));
            assert!(decision
                .forget
                .windows(2)
                .all(|w| time(&w[0]) > time(&w[1])));
        }
    }

    #[test]
    fn the_input_order_does_not_matter() {
        let now = t(END);
        let mut all = history();
        let forward = decide(&Policy::default(), &all, now);
        all.reverse();
        assert_eq!(decide(&Policy::default(), &all, now), forward);
        all.sort_by(|a, b| a.id.len().cmp(&b.id.len()).then(b.id.cmp(&a.id)));
        assert_eq!(decide(&Policy::default(), &all, now), forward);
    }

    /// The controller's loop, driven by a manual clock hour by hour over the three months: a run
    /// whenever the default schedule says one is due (none while the controller is down), retention
    /// after each, and only the kept snapshots stay in the repository. At each golden `now`, what is
    /// left must be exactly the golden set: pruning as we go equals one decision over everything.
    #[test]
    fn simulated_schedule_and_pruning_reach_the_golden_sets() {
        let installation = "sim-32";
        let schedule = Schedule::parse(&default_expression(installation)).unwrap();
        assert_eq!(schedule.to_string(), "17 * * * *");
        let golden = golden();
        let policy = Policy::default();

        // The Backup is created exactly at a scheduled time: that time is not a run.
        let created = t(START) - Duration::hours(1);
        let clock = ManualClock::new(created);
        let controller_clock: std::sync::Arc<dyn Clock> = std::sync::Arc::new(clock.clone());
        let mut repository: Vec<Candidate> = Vec::new();
        let mut taken: Vec<Candidate> = Vec::new();
        let mut last_run = None;
        let mut checked = 0;
        while clock.now() < t(END) {
            let before = clock.now();
            clock.advance(Duration::hours(1));
            let now = controller_clock.now();
            for (time, ok) in MANUAL {
                if before < t(time) && t(time) <= now {
                    repository.push(candidate(t(time), ok));
                    taken.push(candidate(t(time), ok));
                }
            }
            if in_outage(now) {
                continue;
            }
            // Runs missed during an outage collapse into one, at the latest scheduled time.
            let slot = due(&schedule, last_run, created, now).expect("a run is due every hour");
            assert_eq!(slot, now);
            let snapshot = candidate(slot, !run_failed(slot));
            repository.push(snapshot.clone());
            taken.push(snapshot);
            last_run = Some(slot);
            assert_eq!(due(&schedule, last_run, created, now), None);

            let decision = decide(&policy, &repository, now);
            let keep: HashSet<&str> = kept(&decision).into_iter().collect();
            repository.retain(|c| keep.contains(c.id.as_str()));
            assert!(repository.len() <= 40, "at {now}: {}", repository.len());
            if let Some(expected) = golden.get(&now) {
                assert_eq!(lines(&decision), *expected, "at {now}");
                checked += 1;
            }
        }
        assert_eq!(checked, golden.len());
        // The schedule made exactly the golden history.
        let mut expected = history();
        expected.sort_by(|a, b| a.id.cmp(&b.id));
        taken.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(taken, expected);
    }

    #[test]
    fn empty_input_keeps_and_forgets_nothing() {
        let decision = decide(&Policy::default(), &[], t(END));
        assert_eq!(decision, Decision::default());
    }

    #[test]
    fn one_old_snapshot_is_kept_and_one_old_failed_one_is_not() {
        let now = t("2020-03-03T12:00:00Z");
        let decision = decide(
            &Policy::default(),
            &[snap("a", "2019-03-10T08:00:00Z", true)],
            now,
        );
        assert_eq!(
            lines(&decision),
            "a  newest successful, last of month 2019-03\n"
        );
        assert!(decision.forget.is_empty());

        let decision = decide(
            &Policy::default(),
            &[snap("f", "2020-03-01T08:00:00Z", false)],
            now,
        );
        assert!(decision.keep.is_empty());
        assert_eq!(decision.forget, ["f"]);
    }

    #[test]
    fn newest_successful_is_kept_when_every_newer_run_failed() {
        // Only 24 hours of history: the last good snapshot, 50 hours old, is outside every window.
        let policy = Policy {
            hourly: 24,
            daily: 0,
            weekly: 0,
            monthly: Some(0),
        };
        policy.validate().unwrap();
        let now = t("2020-03-03T12:00:00Z");
        let snapshots = [
            snap("f1", "2020-03-03T11:00:00Z", false),
            snap("f2", "2020-03-02T13:00:00Z", false),
            snap("f3", "2020-03-02T11:00:00Z", false),
            snap("good", "2020-03-01T10:00:00Z", true),
            snap("older", "2020-03-01T09:00:00Z", true),
        ];
        let decision = decide(&policy, &snapshots, now);
        assert_eq!(
            lines(&decision),
            "f1  last 24 hours\nf2  last 24 hours\ngood  newest successful\n"
        );
        assert_eq!(decision.forget, ["f3", "older"]);
    }

    #[test]
    fn snapshots_in_the_future_are_kept_and_represent_nothing() {
        let now = t("2020-03-03T12:00:00Z");
        let snapshots = [
            snap("skewed", "2020-03-03T12:05:00Z", true),
            snap("bogus", "2099-01-01T00:00:00Z", true),
            snap("skewed-failed", "2020-03-03T12:01:00Z", false),
            snap("real", "2020-03-03T11:00:00Z", true),
        ];
        let decision = decide(&Policy::default(), &snapshots, now);
        assert_eq!(
            lines(&decision),
            "bogus  dated in the future (clock skew?)\n\
             skewed  dated in the future (clock skew?)\n\
             skewed-failed  dated in the future (clock skew?)\n\
             real  newest successful, last 24 hours, last of day 2020-03-03, last of week 2020-W10, last of month 2020-03\n"
        );
        // A snapshot at exactly `now` is not in the future.
        let decision = decide(
            &Policy::default(),
            &[snap("now", "2020-03-03T12:00:00Z", true)],
            now,
        );
        assert_eq!(decision.keep[0].1[0], Reason::NewestSuccessful);
    }

    #[test]
    fn ties_are_broken_by_id_whatever_the_input_order() {
        let now = t("2020-03-03T12:00:00Z");
        let a = snap("a", "2020-02-10T05:00:00Z", true);
        let b = snap("b", "2020-02-10T05:00:00Z", true);
        let newer = snap("n", "2020-03-03T11:30:00Z", true);
        let policy = Policy {
            hourly: 1,
            daily: 0,
            weekly: 0,
            monthly: None,
        };
        for input in [
            [a.clone(), b.clone(), newer.clone()],
            [b.clone(), a.clone(), newer.clone()],
        ] {
            let decision = decide(&policy, &input, now);
            assert_eq!(
                lines(&decision),
                "n  newest successful, last hour, last of month 2020-03\nb  last of month 2020-02\n"
            );
            assert_eq!(decision.forget, ["a"]);
        }
    }

    #[test]
    fn a_duplicate_id_is_one_snapshot_and_never_forgotten() {
        let now = t("2020-03-03T12:00:00Z");
        let snapshots = [
            snap("x", "2020-03-03T11:00:00Z", true),
            snap("x", "2020-01-01T00:00:00Z", true),
        ];
        let decision = decide(&Policy::default(), &snapshots, now);
        assert_eq!(kept(&decision), ["x"]);
        assert!(decision.forget.is_empty());
    }

    #[test]
    fn the_hourly_window_is_open_at_its_old_end() {
        let now = t("2020-03-03T12:00:00Z");
        let policy = Policy {
            hourly: 24,
            daily: 0,
            weekly: 0,
            monthly: Some(0),
        };
        let snapshots = [
            snap("newest", "2020-03-03T12:00:00Z", true),
            snap("inside", "2020-03-02T12:00:01Z", true),
            snap("edge", "2020-03-02T12:00:00Z", true),
        ];
        let decision = decide(&policy, &snapshots, now);
        assert_eq!(kept(&decision), ["newest", "inside"]);
        assert_eq!(decision.forget, ["edge"]);
    }

    #[test]
    fn a_limited_monthly_window_counts_calendar_months_across_a_year() {
        let now = t("2020-01-15T12:00:00Z");
        let policy = Policy {
            hourly: 0,
            daily: 0,
            weekly: 0,
            monthly: Some(3),
        };
        let snapshots = [
            snap("jan", "2020-01-02T00:00:00Z", true),
            snap("dec", "2019-12-31T23:00:00Z", true),
            snap("dec-early", "2019-12-01T00:00:00Z", true),
            snap("nov", "2019-11-30T23:00:00Z", true),
            snap("oct", "2019-10-31T23:00:00Z", true),
        ];
        let decision = decide(&policy, &snapshots, now);
        assert_eq!(
            lines(&decision),
            "jan  newest successful, last of month 2020-01\n\
             dec  last of month 2019-12\n\
             nov  last of month 2019-11\n"
        );
        assert_eq!(decision.forget, ["dec-early", "oct"]);
    }

    #[test]
    fn a_huge_hourly_window_keeps_everything_rather_than_overflowing() {
        let policy = Policy {
            hourly: u32::MAX,
            daily: u32::MAX,
            weekly: u32::MAX,
            monthly: Some(u32::MAX),
        };
        let snapshots = [
            snap("new", "2020-03-03T11:00:00Z", true),
            snap("ancient", "0001-01-01T00:00:00Z", false),
        ];
        let decision = decide(&policy, &snapshots, t("2020-03-03T12:00:00Z"));
        assert_eq!(kept(&decision), ["new", "ancient"]);
    }

    #[test]
    fn policy_default_validation_and_text() {
        let policy = Policy::default();
        assert_eq!(
            policy,
            Policy {
                hourly: 24,
                daily: 7,
                weekly: 4,
                monthly: None
            }
        );
        assert_eq!(policy.validate(), Ok(()));
        assert_eq!(
            policy.to_string(),
            "all of the last 24 h, last of each day for 7 d, of each week for 4 w, of each month forever"
        );
        let nothing = Policy {
            hourly: 0,
            daily: 0,
            weekly: 0,
            monthly: Some(0),
        };
        assert_eq!(
            nothing.validate().unwrap_err(),
            "retention keeps no history: hourly, daily, weekly and monthly are all 0, which would keep \
             only the newest successful snapshot; set at least one of them (leave monthly out to keep \
             one snapshot per month forever)"
        );
        // Monthly forever alone is history enough; so is one hour.
        for fine in [
            Policy {
                monthly: None,
                ..nothing
            },
            Policy {
                hourly: 1,
                ..nothing
            },
        ] {
            assert_eq!(fine.validate(), Ok(()));
        }
        assert_eq!(
            Policy {
                monthly: Some(12),
                ..policy
            }
            .to_string(),
            "all of the last 24 h, last of each day for 7 d, of each week for 4 w, of each month for 12 mo"
        );
    }

    #[test]
    fn policy_serde_is_camel_case_with_defaults() {
        let policy: Policy = serde_json::from_str(r#"{"daily": 14}"#).unwrap();
        assert_eq!(
            policy,
            Policy {
                daily: 14,
                ..Policy::default()
            }
        );
        let policy: Policy = serde_json::from_str(r#"{"monthly": 12}"#).unwrap();
        assert_eq!(policy.monthly, Some(12));
        let policy: Policy = serde_json::from_str(r#"{"monthly": null}"#).unwrap();
        assert_eq!(policy.monthly, None);
        let err = serde_json::from_str::<Policy>(r#"{"dayly": 14}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `dayly`"), "{err}");
        assert_eq!(
            serde_json::to_string(&Policy::default()).unwrap(),
            r#"{"hourly":24,"daily":7,"weekly":4}"#
        );
    }

    #[test]
    fn reasons_render_as_text() {
        let day = NaiveDate::from_ymd_opt(2019, 12, 30).unwrap();
        let cases = [
            (Reason::InFuture, "dated in the future (clock skew?)"),
            (Reason::NewestSuccessful, "newest successful"),
            (Reason::Hourly { hours: 1 }, "last hour"),
            (Reason::Hourly { hours: 24 }, "last 24 hours"),
            (Reason::Daily(day), "last of day 2019-12-30"),
            (Reason::Weekly(day.iso_week()), "last of week 2020-W01"),
            (
                Reason::Monthly {
                    year: 2020,
                    month: 2,
                },
                "last of month 2020-02",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
        assert_eq!(
            render(&[Reason::NewestSuccessful, Reason::Daily(day)]),
            "newest successful, last of day 2019-12-30"
        );
        assert_eq!(render(&[]), "");
    }
}
