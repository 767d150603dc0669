//! Progress of long transfers on standard error — `push` uploading blobs, `convert`
//! reading every blob, `mount --prefetch` — in the form the place it goes to can take:
//! bars with bytes, rate and ETA on a terminal (indicatif); plain lines elsewhere (a
//! pipe, journald, a log file), a line per tenth of the way and at least every
//! [`LINE_INTERVAL`] while bytes move, with no carriage return or escape code; and log
//! events when logs are JSON, so that a log shipper reads every line as an object.
//!
//! Whatever else goes to standard error while bars are drawn goes through [`Progress`]
//! too, so that nothing tears a bar: a command's own lines through [`Progress::println`],
//! log lines through [`Progress::log_writer`], which clears the bars around each line.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, HumanDuration, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Longest a plain-line bar stays silent while bytes move: a tenth of a large model's
/// blob can take minutes on a slow link, and a silent log looks like a hung command.
pub const LINE_INTERVAL: Duration = Duration::from_secs(15);

/// A bar on a terminal: label, bar, bytes done and total, rate, time left.
const BAR_TEMPLATE: &str = "{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}";

/// Where progress is shown.
#[derive(Debug, Clone)]
enum Output {
    /// Bars drawn on a terminal, all in one group so that lines can be written above them.
    Bars(MultiProgress),
    /// Plain lines on standard error.
    Lines,
    /// `info` log events (logs are JSON).
    Events,
}

/// Where a command's progress and its own lines go; clones share the bars.
#[derive(Debug, Clone)]
pub struct Progress {
    output: Output,
}

impl Progress {
    /// Progress on standard error: log events when logs are `json`, else bars on a
    /// terminal and plain lines elsewhere.
    pub fn stderr(log_format: LogFormat) -> Self {
        let output = match log_format {
            LogFormat::Json => Output::Events,
            LogFormat::Text if io::stderr().is_terminal() => {
                Output::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
            }
            LogFormat::Text => Output::Lines,
        };
        Self { output }
    }

    /// A bar for a transfer of `total` bytes, named `label` (`[1/3] model.safetensors`).
    pub fn bar(&self, label: impl Into<String>, total: u64) -> Bar {
        let label = label.into();
        let shown = match &self.output {
            Output::Bars(bars) => {
                let style = ProgressStyle::with_template(BAR_TEMPLATE).expect("the bar template parses");
                Shown::Drawn(bars.add(ProgressBar::new(total).with_style(style).with_message(label)))
            }
            Output::Lines => Shown::Lines { label, events: false, pacer: Mutex::new(Pacer::new(total)) },
            Output::Events => Shown::Lines { label, events: true, pacer: Mutex::new(Pacer::new(total)) },
        };
        Bar { shown }
    }

    /// Writes one of the command's own lines (a blob pushed, a notice) above the bars.
    pub fn println(&self, line: &str) {
        match &self.output {
            Output::Bars(bars) => bars.suspend(|| eprintln!("{line}")),
            Output::Lines => eprintln!("{line}"),
            Output::Events => tracing::info!("{line}"),
        }
    }

    /// Writes why the command failed, as its last line: `error: MESSAGE`, or an `error`
    /// event when logs are JSON.
    pub fn error(&self, message: &str) {
        match &self.output {
            Output::Events => tracing::error!("{message}"),
            Output::Bars(_) | Output::Lines => self.println(&format!("error: {message}")),
        }
    }

    /// What log lines are written with: standard error, the bars cleared around each line.
    pub fn log_writer(&self) -> LogWriter {
        match &self.output {
            Output::Bars(bars) => LogWriter { bars: Some(bars.clone()) },
            Output::Lines | Output::Events => LogWriter { bars: None },
        }
    }
}

/// One transfer's progress. Cleared from the terminal when finished or dropped, so an
/// error that ends the transfer leaves no half-drawn bar behind.
#[derive(Debug)]
pub struct Bar {
    shown: Shown,
}

#[derive(Debug)]
enum Shown {
    Drawn(ProgressBar),
    /// Plain lines, or log events when `events`.
    Lines {
        label: String,
        events: bool,
        pacer: Mutex<Pacer>,
    },
}

impl Bar {
    /// Counts `bytes` more done.
    pub fn inc(&self, bytes: u64) {
        match &self.shown {
            Shown::Drawn(bar) => bar.inc(bytes),
            Shown::Lines { pacer, .. } => {
                let mut pacer = pacer.lock().expect("progress lock");
                let done = pacer.done.saturating_add(bytes);
                self.advance(&mut pacer, done);
            }
        }
    }

    /// Sets the bytes done so far (they may go back: an upload tried again).
    pub fn set_position(&self, done: u64) {
        match &self.shown {
            Shown::Drawn(bar) => bar.set_position(done),
            Shown::Lines { pacer, .. } => self.advance(&mut pacer.lock().expect("progress lock"), done),
        }
    }

    /// Ends the bar: cleared from the terminal, no line written from now on.
    pub fn finish(&self) {
        match &self.shown {
            Shown::Drawn(bar) => bar.finish_and_clear(),
            Shown::Lines { pacer, .. } => pacer.lock().expect("progress lock").finished = true,
        }
    }

    fn advance(&self, pacer: &mut Pacer, done: u64) {
        let Shown::Lines { label, events, .. } = &self.shown else { return };
        let now = Instant::now();
        if !pacer.advance(done, now) {
            return;
        }
        let elapsed = now.duration_since(pacer.started);
        let line = plain_line(label, done, pacer.total, elapsed);
        if *events {
            tracing::info!(
                label = %label,
                done_bytes = done,
                total_bytes = pacer.total,
                bytes_per_second = rate(done, elapsed).map_or(0, |r| r as u64),
                "{line}"
            );
        } else {
            eprintln!("{line}");
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Shown::Drawn(bar) = &self.shown {
            bar.finish_and_clear();
        }
    }
}

/// When a bar without a terminal writes a line: at each tenth of the way, and after
/// [`LINE_INTERVAL`] without one if bytes moved meanwhile; never once the transfer is
/// complete (the command says so in its own words) or the bar finished.
#[derive(Debug)]
struct Pacer {
    total: u64,
    started: Instant,
    done: u64,
    finished: bool,
    /// When the last line was written (the start, before any), and at which tenth and
    /// byte count.
    line_at: Instant,
    line_tenth: u64,
    line_done: u64,
}

impl Pacer {
    fn new(total: u64) -> Self {
        let now = Instant::now();
        Self { total, started: now, done: 0, finished: false, line_at: now, line_tenth: 0, line_done: 0 }
    }

    /// Records `done` bytes at `now`; says whether a line is due.
    fn advance(&mut self, done: u64, now: Instant) -> bool {
        self.done = done;
        if self.finished || done >= self.total {
            return false;
        }
        let tenth = tenths(done, self.total);
        let due =
            tenth > self.line_tenth || (now.duration_since(self.line_at) >= LINE_INTERVAL && done > self.line_done);
        if due {
            (self.line_at, self.line_tenth, self.line_done) = (now, tenth.max(self.line_tenth), done);
        }
        due
    }
}

/// How many whole tenths of `total` `done` is.
fn tenths(done: u64, total: u64) -> u64 {
    (u128::from(done) * 10 / u128::from(total.max(1))) as u64
}

/// Bytes per second over `elapsed`, when any time passed.
fn rate(done: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    (secs > 0.0).then(|| done as f64 / secs)
}

/// A progress line for a log or a pipe: `LABEL: DONE of TOTAL bytes (P%)`, then the
/// average rate and the time left once bytes have moved. Counts are exact bytes, as the
/// commands' closing lines give them.
fn plain_line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let percent = u128::from(done) * 100 / u128::from(total.max(1));
    let mut line = format!("{label}: {done} of {total} bytes ({percent}%)");
    if let Some(rate) = rate(done, elapsed).filter(|r| *r >= 1.0) {
        let left = Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate);
        line += &format!(", {}/s, {} left", HumanBytes(rate as u64), HumanDuration(left));
    }
    line
}

/// Writes log lines to standard error, clearing the bars (if any) around each line and
/// drawing them again below it. The formatter writes each event in one `write`.
#[derive(Debug, Clone)]
pub struct LogWriter {
    bars: Option<MultiProgress>,
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> LogLine<'a> {
        LogLine { bars: self.bars.as_ref() }
    }
}

/// One log event on its way to standard error.
#[derive(Debug)]
pub struct LogLine<'a> {
    bars: Option<&'a MultiProgress>,
}

impl Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Standard error is locked inside `suspend`, never around it: a bar being drawn
        // holds the bars' lock while it writes to standard error.
        match self.bars {
            Some(bars) => bars.suspend(|| io::stderr().write_all(buf))?,
            None => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_line_gives_exact_bytes_rate_and_time_left() {
        assert_eq!(
            plain_line("[1/3] model.safetensors", 10 * MIB, 40 * MIB, Duration::from_secs(2)),
            "[1/3] model.safetensors: 10485760 of 41943040 bytes (25%), 5.00 MiB/s, 6 seconds left"
        );
        assert_eq!(plain_line("prefetch (all)", 0, 300, Duration::from_secs(1)), "prefetch (all): 0 of 300 bytes (0%)");
        assert_eq!(plain_line("x", 5, 10, Duration::ZERO), "x: 5 of 10 bytes (50%)", "no rate before time passes");
        assert_eq!(plain_line("x", 0, 0, Duration::ZERO), "x: 0 of 0 bytes (0%)");
        let huge = u64::MAX - 1;
        assert!(plain_line("x", huge / 2, huge, Duration::from_secs(1)).contains("(50%)"), "no overflow");
    }

    #[test]
    fn lines_come_at_each_tenth_and_after_silence() {
        let mut pacer = Pacer::new(1000);
        let t0 = pacer.started;
        let at = |secs| t0 + Duration::from_secs(secs);
        assert!(!pacer.advance(50, at(1)), "not yet a tenth");
        assert!(pacer.advance(100, at(1)), "the first tenth");
        assert!(!pacer.advance(150, at(2)));
        assert!(pacer.advance(350, at(3)), "two tenths at once give one line");
        assert!(!pacer.advance(350, at(3) + LINE_INTERVAL), "silence without bytes moving");
        assert!(pacer.advance(360, at(3) + LINE_INTERVAL), "silence while bytes moved");
        assert!(!pacer.advance(399, at(4) + LINE_INTERVAL));
        assert!(pacer.advance(400, at(4) + LINE_INTERVAL), "the next tenth");
        assert!(!pacer.advance(1000, at(5) + LINE_INTERVAL * 2), "complete: the command says so");
    }

    #[test]
    fn a_transfer_going_back_writes_again_only_past_its_furthest_tenth() {
        let mut pacer = Pacer::new(100);
        let t0 = pacer.started;
        assert!(pacer.advance(55, t0));
        assert!(!pacer.advance(10, t0), "an upload tried again starts over");
        assert!(!pacer.advance(50, t0));
        assert!(pacer.advance(60, t0));
    }

    #[test]
    fn a_finished_bar_is_silent() {
        let mut pacer = Pacer::new(100);
        pacer.finished = true;
        assert!(!pacer.advance(50, pacer.started + LINE_INTERVAL));
    }
}
