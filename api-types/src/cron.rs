//! Cron expressions as berth accepts them: a standard five-field expression (minute hour
//! day-of-month month day-of-week, UTC) or one of `@hourly`, `@daily` (`@midnight`), `@weekly`,
//! `@monthly`, `@yearly` (`@annually`), checked field by field so a mistake is named exactly
//! ("minute field `61` is out of range 0-59"). Only the portable syntax is accepted: numbers, month
//! and day names, `*`, ranges `a-b`, steps `*/n` and `a-b/n`, and lists; extensions (`L`, `W`, `#`,
//! `?`) are refused, so an expression means the same to anyone who knows cron. Day-of-week 0 and 7
//! are both Sunday. An expression that can never fire (`0 0 30 2 *`) is refused. The API checks a
//! Backup's schedules with this at apply; the Backup controller then finds the times
//! (`controllers/src/backup/schedule.rs`).

/// Checks `expr` field by field and returns it as five fields (a nickname expanded); the error
/// names the field and what is wrong with it.
pub fn check(expr: &str) -> Result<String, String> {
    let expression = expr.trim();
    let five = match expression.strip_prefix('@') {
        Some(nickname) => expand_nickname(nickname)?.to_string(),
        None => expression.to_string(),
    };
    let parts: Vec<&str> = five.split_whitespace().collect();
    if parts.is_empty() {
        return Err(format!("the schedule is empty; expected {SHAPE}"));
    }
    if parts.len() != 5 {
        return Err(format!(
            "`{expression}` has {} field(s); expected {SHAPE}",
            parts.len()
        ));
    }
    let mut sets = [0u64; 5];
    for ((set, field), text) in sets.iter_mut().zip(&FIELDS).zip(&parts) {
        *set = field.parse(text)?;
    }
    if never_fires(&parts, &sets) {
        return Err(format!(
            "`{expression}` never fires: no month it names has the day of the month it names"
        ));
    }
    Ok(parts.join(" "))
}

const SHAPE: &str = "5 fields, minute hour day-of-month month day-of-week (UTC), \
                     or one of @hourly, @daily, @weekly, @monthly, @yearly";

fn expand_nickname(nickname: &str) -> Result<&'static str, String> {
    Ok(match nickname.to_ascii_lowercase().as_str() {
        "hourly" => "0 * * * *",
        "daily" | "midnight" => "0 0 * * *",
        "weekly" => "0 0 * * 0",
        "monthly" => "0 0 1 * *",
        "yearly" | "annually" => "0 0 1 1 *",
        _ => return Err(format!("unknown shortcut `@{nickname}`; expected {SHAPE}")),
    })
}

/// One of the five fields: its name in messages, its range, and the names it accepts.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    /// Three-letter names for the values from `min` on.
    names: &'static [&'static str],
    names_hint: &'static str,
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
        names_hint: "",
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
        names_hint: "",
    },
    Field {
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
        names_hint: "",
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &[
            "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
        ],
        names_hint: " or a month name (JAN-DEC)",
    },
    Field {
        name: "day-of-week",
        min: 0,
        max: 7,
        names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
        names_hint: " or a day name (SUN-SAT)",
    },
];

impl Field {
    /// The values the field selects, as bits. The error names the field, the field's text and,
    /// when that is not the whole field, the part of it that is wrong.
    fn parse(&self, text: &str) -> Result<u64, String> {
        let problem = |part: &str, what: String| {
            if part == text {
                format!("{} field `{text}` {what}", self.name)
            } else {
                format!("{} field `{text}`: `{part}` {what}", self.name)
            }
        };
        let mut set = 0u64;
        for item in text.split(',') {
            if item.is_empty() {
                return Err(problem(text, "has an empty list item".to_string()));
            }
            let (base, step) = match item.split_once('/') {
                Some((base, step)) => {
                    let n: u32 = step.parse().map_err(|_| {
                        problem(item, format!("has step `{step}`, which is not a number"))
                    })?;
                    if n == 0 {
                        return Err(problem(
                            item,
                            "has step 0; a step is at least 1".to_string(),
                        ));
                    }
                    (base, Some(n))
                }
                None => (item, None),
            };
            let (low, high) = if base == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = base.split_once('-') {
                if a.is_empty() || b.is_empty() {
                    return Err(problem(
                        base,
                        "needs a value on each side of `-`".to_string(),
                    ));
                }
                let (low, high) = (self.value(a, &problem)?, self.value(b, &problem)?);
                if low > high {
                    return Err(problem(
                        base,
                        "runs backwards; wrap-around ranges are not supported".to_string(),
                    ));
                }
                (low, high)
            } else {
                let value = self.value(base, &problem)?;
                if step.is_some() {
                    return Err(problem(
                        item,
                        format!(
                            "steps from a single value; a step needs `*` or a range before it, \
                             e.g. `*/{0}` or `{1}-{2}/{0}`",
                            step.unwrap_or(1),
                            value,
                            self.max
                        ),
                    ));
                }
                (value, value)
            };
            let step = step.unwrap_or(1) as usize;
            for v in (low..=high).step_by(step) {
                set |= 1 << v;
            }
        }
        Ok(set)
    }

    fn value(&self, part: &str, problem: &dyn Fn(&str, String) -> String) -> Result<u32, String> {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            return match part.parse::<u32>() {
                Ok(v) if (self.min..=self.max).contains(&v) => Ok(v),
                _ => Err(problem(
                    part,
                    format!("is out of range {}-{}", self.min, self.max),
                )),
            };
        }
        match self
            .names
            .iter()
            .position(|name| name.eq_ignore_ascii_case(part))
        {
            // Names count from the field's minimum: JAN = 1, SUN = 0.
            Some(i) => Ok(self.min + i as u32),
            None => Err(problem(part, format!("is not a number{}", self.names_hint))),
        }
    }
}

/// True when day-of-month alone decides the day (day-of-week is `*`) and no month named has any
/// of the days named: 30 February, 31 April.
fn never_fires(parts: &[&str], sets: &[u64; 5]) -> bool {
    const LONGEST: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if parts[4] != "*" || parts[2] == "*" {
        return false;
    }
    let (days, months) = (sets[2], sets[3]);
    !(1..=12u32).any(|m| {
        months & (1 << m) != 0 && (1..=LONGEST[m as usize - 1]).any(|d| days & (1 << d) != 0)
    })
}
