//! The report of `bench`: every measured quantity with its runs, the reference it is
//! compared with in the same runs, and its target; written as `report.json` (everything),
//! `report.md` (the table, also printed) and `report.svg` (a bar per target, each on its
//! own scale with its target marked).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// How a target compares.
#[derive(Clone, Copy, PartialEq)]
pub enum Cmp {
    Below,
    AtMost,
    AtLeast,
}

impl Cmp {
    fn holds(self, x: f64, limit: f64) -> bool {
        match self {
            Cmp::Below => x < limit,
            Cmp::AtMost => x <= limit,
            Cmp::AtLeast => x >= limit,
        }
    }

    fn sign(self) -> &'static str {
        match self {
            Cmp::Below => "<",
            Cmp::AtMost => "≤",
            Cmp::AtLeast => "≥",
        }
    }
}

/// A target: on the value itself (in its unit), or on its ratio to the reference.
pub struct Target {
    pub on_ratio: bool,
    pub cmp: Cmp,
    pub limit: f64,
    /// A further goal with the same comparison, where the issue sets one.
    pub goal: Option<f64>,
}

impl Target {
    pub fn value(cmp: Cmp, limit: f64) -> Self {
        Self { on_ratio: false, cmp, limit, goal: None }
    }

    pub fn ratio(cmp: Cmp, limit: f64) -> Self {
        Self { on_ratio: true, cmp, limit, goal: None }
    }

    pub fn with_goal(mut self, goal: f64) -> Self {
        self.goal = Some(goal);
        self
    }
}

/// The quantity a measure is compared with, measured in the same runs.
pub struct Reference {
    pub what: String,
    pub samples: Vec<f64>,
}

/// One measured quantity.
pub struct Measure {
    pub group: &'static str,
    pub id: String,
    pub what: String,
    pub unit: &'static str,
    /// One value per measured run (the warm-up run is not among them).
    pub samples: Vec<f64>,
    pub reference: Option<Reference>,
    pub target: Option<Target>,
    /// Said next to the value when there is no reference.
    pub note: Option<String>,
}

impl Measure {
    pub fn new(group: &'static str, id: String, what: String, unit: &'static str, samples: Vec<f64>) -> Self {
        Self { group, id, what, unit, samples, reference: None, target: None, note: None }
    }

    pub fn against(mut self, what: impl Into<String>, samples: Vec<f64>) -> Self {
        self.reference = Some(Reference { what: what.into(), samples });
        self
    }

    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    pub fn value(&self) -> f64 {
        median(&self.samples)
    }

    /// The median of the per-run ratios to the reference (noise common to both sides of
    /// a run cancels), or of the medians when the runs do not pair up.
    pub fn ratio(&self) -> Option<f64> {
        let r = self.reference.as_ref()?;
        if r.samples.len() == self.samples.len() {
            Some(median(&self.samples.iter().zip(&r.samples).map(|(a, b)| a / b).collect::<Vec<_>>()))
        } else {
            Some(self.value() / median(&r.samples))
        }
    }

    /// What the target is checked on: the ratio, or the value.
    fn checked(&self, t: &Target) -> f64 {
        if t.on_ratio {
            self.ratio().unwrap_or(f64::NAN)
        } else {
            self.value()
        }
    }

    pub fn met(&self) -> Option<bool> {
        self.target.as_ref().map(|t| t.cmp.holds(self.checked(t), t.limit))
    }

    fn goal_met(&self) -> Option<bool> {
        let t = self.target.as_ref()?;
        t.goal.map(|g| t.cmp.holds(self.checked(t), g))
    }

    fn format(&self, x: f64) -> String {
        format_unit(x, self.unit)
    }

    fn target_text(&self) -> String {
        let Some(t) = &self.target else { return String::new() };
        let limit = |l: f64| if t.on_ratio { ratio_text(l) } else { format_limit(l, self.unit) };
        let mut s = format!("{} {}", t.cmp.sign(), limit(t.limit));
        if let Some(g) = t.goal {
            let _ = write!(s, " (goal {} {})", t.cmp.sign(), limit(g));
        }
        s
    }
}

/// `0.7×`, `1.0×`, `0.95×`.
fn ratio_text(x: f64) -> String {
    let mut s = format!("{x:.2}");
    if s.ends_with('0') {
        s.pop();
    }
    s + "×"
}

/// A target's limit, with no more digits than it has: `100 ms`, `24 MiB`, `1 s/GiB`.
fn format_limit(x: f64, unit: &str) -> String {
    match unit {
        "bytes" => format!("{} MiB", x / f64::from(1u32 << 20)),
        unit => format!("{x} {unit}"),
    }
}

pub fn format_unit(x: f64, unit: &str) -> String {
    match unit {
        "bytes" => format!("{:.1} MiB", x / f64::from(1u32 << 20)),
        "MB/s" => format!("{x:.0} MB/s"),
        "ms" if x < 10.0 => format!("{x:.2} ms"),
        "ms" => format!("{x:.1} ms"),
        "/GiB" => format!("{} /GiB", thousands(x)),
        unit => format!("{x:.2} {unit}"),
    }
}

fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 {
        out.insert(0, '-');
    }
    out
}

/// How the runs were made, for the report's header.
pub struct Setup {
    pub runs: usize,
    pub page_cache: &'static str,
    pub context_switches: &'static str,
    pub verified_download: &'static str,
    pub models: serde_json::Value,
}

fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    json!({
        "cpus": cpus,
        "cpu": field("model name").unwrap_or_default(),
        "sha_ni": has("sha_ni"),
        "avx512f": has("avx512f"),
        "memory_gib": (mem_kib / f64::from(1u32 << 20) * 10.0).round() / 10.0,
        "kernel": kernel,
    })
}

pub fn write(measures: &[Measure], setup: &Setup) {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let machine = machine();
    let entries: Vec<serde_json::Value> = measures
        .iter()
        .map(|m| {
            json!({
                "group": m.group, "id": m.id, "what": m.what, "unit": m.unit,
                "value": m.value(), "runs": m.samples,
                "reference": m.reference.as_ref().map(|r| json!({"what": r.what, "value": median(&r.samples), "runs": r.samples})),
                "ratio": m.ratio(),
                "note": m.note,
                "target": m.target.as_ref().map(|t| json!({
                    "text": m.target_text(), "on": if t.on_ratio { "ratio" } else { "value" },
                    "limit": t.limit, "met": m.met(), "goal": t.goal, "goal_met": m.goal_met(),
                })),
            })
        })
        .collect();
    let report = json!({
        "machine": machine,
        "runs": setup.runs,
        "warmup_runs": 1,
        "page_cache": setup.page_cache,
        "context_switches": setup.context_switches,
        "verified_download": setup.verified_download,
        "models": setup.models,
        "measures": entries,
    });
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report).unwrap()).unwrap();

    let targets: Vec<bool> = measures.iter().filter_map(Measure::met).collect();
    let mut md = String::new();
    let _ = writeln!(md, "# modelpack-snapshotter benchmark\n");
    let _ = writeln!(
        md,
        "CPU: {} ({} CPUs{}{}); memory {} GiB; kernel {}.\n",
        machine["cpu"].as_str().unwrap_or("unknown"),
        machine["cpus"],
        if machine["sha_ni"] == true { ", SHA-NI" } else { "" },
        if machine["avx512f"] == true { ", AVX-512" } else { "" },
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        md,
        "Each value is the median of {} after one unmeasured warm-up run; a ratio is the median of \
         the per-run ratios, both sides measured in the same run. Targets met: {} of {}.\n",
        runs_text(setup.runs),
        targets.iter().filter(|m| **m).count(),
        targets.len()
    );
    let _ = writeln!(md, "Page cache: {}\n", setup.page_cache);
    let _ = writeln!(md, "Context switches: {}\n", setup.context_switches);
    let _ = writeln!(md, "Verified download: {}\n", setup.verified_download);
    let _ = writeln!(md, "| measure | value | next to | ratio | target | met |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- |");
    let mut group = "";
    for m in measures {
        if m.group != group {
            group = m.group;
            let _ = writeln!(md, "| **{group}** | | | | | |");
        }
        let (next_to, ratio) = match (&m.reference, m.ratio()) {
            (Some(r), Some(ratio)) => (format!("{}: {}", r.what, m.format(median(&r.samples))), format!("{ratio:.2}×")),
            _ => (m.note.clone().unwrap_or_default(), String::new()),
        };
        let met = match (m.met(), m.goal_met()) {
            (Some(true), Some(false)) => "yes (goal: **no**)".to_owned(),
            (Some(true), _) => "yes".to_owned(),
            (Some(false), _) => "**no**".to_owned(),
            (None, _) => String::new(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {next_to} | {ratio} | {} | {met} |",
            m.what,
            m.format(m.value()),
            m.target_text()
        );
    }
    std::fs::write(out.join("report.md"), &md).unwrap();
    std::fs::write(out.join("report.svg"), chart(measures, &machine, setup.runs)).unwrap();
    println!("{md}");
    println!("written: {}/report.{{json,md,svg}}", out.display());
}

fn runs_text(runs: usize) -> String {
    if runs == 1 {
        "1 run".to_owned()
    } else {
        format!("{runs} runs")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Splits `text` into lines of at most `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines
}

/// A bar per measure with a target, grouped as in the table. Each bar is on its own scale
/// (the value, or the ratio to its reference, from 0 to a little past the larger of it and
/// its target), with the target drawn as a solid line and a goal as a dashed one; green
/// when the target is met, red when it is not.
fn chart(measures: &[Measure], machine: &serde_json::Value, runs: usize) -> String {
    const W: f64 = 1180.0;
    const LABEL_X: f64 = 16.0;
    const LABEL_CHARS: usize = 72;
    const BAR_X: f64 = 560.0;
    const BAR_W: f64 = 400.0;
    const LINE: f64 = 16.0;
    let rows: Vec<&Measure> = measures.iter().filter(|m| m.target.is_some()).collect();
    let mut body = String::new();
    let mut y = 58.0;
    let mut group = "";
    for m in rows {
        let t = m.target.as_ref().unwrap();
        if m.group != group {
            group = m.group;
            y += 10.0;
            let _ = write!(
                body,
                r#"<text x="{LABEL_X}" y="{}" font-weight="bold" font-size="14">{}</text>"#,
                y + 14.0,
                escape(group)
            );
            let _ = write!(
                body,
                r##"<line x1="{LABEL_X}" y1="{}" x2="{}" y2="{}" stroke="#bbb"/>"##,
                y + 20.0,
                W - 16.0,
                y + 20.0
            );
            y += 26.0;
        }
        let label = wrap(&m.what, LABEL_CHARS);
        let h = (label.len() as f64 * LINE).max(2.0 * LINE) + 12.0;
        for (i, line) in label.iter().enumerate() {
            let _ =
                write!(body, r#"<text x="{LABEL_X}" y="{:.1}">{}</text>"#, y + 14.0 + i as f64 * LINE, escape(line));
        }
        let q = m.checked(t);
        let top = t.goal.map_or(t.limit, |g| g.max(t.limit)).max(if q.is_finite() { q } else { 0.0 });
        let scale = BAR_W / (top * 1.15).max(f64::MIN_POSITIVE);
        let x = |v: f64| BAR_X + v.max(0.0) * scale;
        let color = if m.met() == Some(true) { "#2e8b57" } else { "#c8403a" };
        let bar_y = y + 17.0;
        let _ = write!(
            body,
            r#"<rect x="{BAR_X}" y="{bar_y:.1}" width="{:.1}" height="14" fill="{color}"/>"#,
            (x(q) - BAR_X).max(1.0)
        );
        let limit = |l: f64| if t.on_ratio { ratio_text(l) } else { format_limit(l, m.unit) };
        // The target's label right of its line; a goal's on the side away from the target.
        let mark = |body: &mut String, v: f64, dash: &str, text: String, left: bool| {
            let _ = write!(
                body,
                r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#222" stroke-width="2"{dash}/>"##,
                x(v),
                y + 3.0,
                bar_y + 18.0
            );
            let (tx, anchor) = if left { (x(v) - 4.0, "end") } else { (x(v) + 4.0, "start") };
            let _ = write!(
                body,
                r##"<text x="{tx:.1}" y="{:.1}" font-size="11" fill="#222" text-anchor="{anchor}">{}</text>"##,
                y + 11.0,
                escape(&text)
            );
        };
        mark(&mut body, t.limit, "", format!("target {} {}", t.cmp.sign(), limit(t.limit)), false);
        if let Some(g) = t.goal {
            let text = format!("goal {} {}", t.cmp.sign(), limit(g));
            mark(&mut body, g, r#" stroke-dasharray="4 3""#, text, g < t.limit);
        }
        let shown = if t.on_ratio {
            let r = m.reference.as_ref().unwrap();
            format!("{q:.2}× ({} vs {})", m.format(m.value()), m.format(median(&r.samples)))
        } else {
            m.format(q)
        };
        // A white halo keeps the value legible where a target line crosses it.
        let _ = write!(
            body,
            r#"<text x="{:.1}" y="{:.1}" stroke="white" stroke-width="4" paint-order="stroke">{}</text>"#,
            x(q) + 5.0,
            bar_y + 12.0,
            escape(&shown)
        );
        y += h;
    }
    let height = y + 16.0;
    let title = format!(
        "modelpack-snapshotter bench: every target, each bar on its own scale. Green: met; red: missed; \
         line: target; dashed: goal. Median of {}; {} × {}.",
        runs_text(runs),
        machine["cpus"],
        machine["cpu"].as_str().unwrap_or("unknown CPU")
    );
    let mut svg = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="DejaVu Sans, Verdana, sans-serif" font-size="12.5"><rect width="100%" height="100%" fill="white"/>"#
    );
    for (i, line) in wrap(&title, 150).iter().enumerate() {
        let _ =
            write!(svg, r#"<text x="{LABEL_X}" y="{}" font-size="13">{}</text>"#, 22.0 + i as f64 * 17.0, escape(line));
    }
    svg.push_str(&body);
    svg.push_str("</svg>\n");
    svg
}
