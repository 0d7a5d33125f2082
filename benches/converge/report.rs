//! The table `make bench` prints: one row per number, with its target and
//! whether it is met beside it (a missed target is reported, never fatal).

/// A target a number is compared against.
pub struct Target {
    /// The target in words, e.g. `p99 ≤ 10 ms`.
    pub text: String,
    /// Whether the number meets it.
    pub met: bool,
}

impl Target {
    /// `value ≤ limit` (`unit` after the limit); a missing value misses.
    pub fn at_most(label: &str, value: f64, limit: f64, unit: &str) -> Self {
        Self {
            text: format!("{label}≤ {limit} {unit}").trim_end().to_owned(),
            met: value.is_finite() && value <= limit,
        }
    }

    /// `value < limit`; a missing value misses.
    pub fn below(label: &str, value: f64, limit: f64, unit: &str) -> Self {
        Self {
            text: format!("{label}< {limit} {unit}").trim_end().to_owned(),
            met: value.is_finite() && value < limit,
        }
    }
}

/// One row: what was measured, the number, and the target if there is one.
struct Row {
    measure: String,
    value: String,
    target: Option<Target>,
}

/// The table being built.
#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    /// Adds a row without a target.
    pub fn row(&mut self, measure: impl Into<String>, value: impl Into<String>) {
        self.rows.push(Row {
            measure: measure.into(),
            value: value.into(),
            target: None,
        });
    }

    /// Adds a row compared against `target`.
    pub fn checked(
        &mut self,
        measure: impl Into<String>,
        value: impl Into<String>,
        target: Target,
    ) {
        self.rows.push(Row {
            measure: measure.into(),
            value: value.into(),
            target: Some(target),
        });
    }

    /// Prints the table to stdout.
    pub fn print(&self) {
        let width = |f: &dyn Fn(&Row) -> usize, header: &str| {
            self.rows
                .iter()
                .map(f)
                .chain([header.chars().count()])
                .max()
                .unwrap_or(0)
        };
        let w_measure = width(&|r| r.measure.chars().count(), "measure");
        let w_value = width(&|r| r.value.chars().count(), "value");
        let w_target = width(
            &|r| r.target.as_ref().map_or(0, |t| t.text.chars().count()),
            "target",
        );
        println!(
            "{:<w_measure$}  {:<w_value$}  {:<w_target$}  met",
            "measure", "value", "target"
        );
        println!(
            "{}  {}  {}  ---",
            "-".repeat(w_measure),
            "-".repeat(w_value),
            "-".repeat(w_target)
        );
        for Row {
            measure,
            value,
            target,
        } in &self.rows
        {
            let (text, mark) = match target {
                Some(t) => (t.text.as_str(), if t.met { "✓" } else { "✗" }),
                None => ("", ""),
            };
            println!("{measure:<w_measure$}  {value:<w_value$}  {text:<w_target$}  {mark}");
        }
    }
}

/// A number for the summary line: `n/a` when missing.
pub fn num(value: f64, decimals: usize) -> String {
    if value.is_nan() {
        "n/a".into()
    } else if value.is_infinite() {
        "inf".into()
    } else {
        format!("{value:.decimals$}")
    }
}

/// Thousands separated by commas, for user counts.
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
