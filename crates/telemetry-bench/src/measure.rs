//! What the bench reads off the machine: a process's CPU time and peak memory from `/proc`, the
//! CPU model, and percentiles of latency samples.

use serde::Serialize;

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Samples they were taken over.
    pub samples: u64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `micros` (microseconds), in milliseconds; nearest-rank.
    pub fn of_micros(mut micros: Vec<i64>) -> Self {
        if micros.is_empty() {
            return Percentiles::default();
        }
        micros.sort_unstable();
        let rank = |share: f64| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let index = ((share * micros.len() as f64).ceil() as usize).clamp(1, micros.len()) - 1;
            #[allow(clippy::cast_precision_loss)]
            let millis = micros[index] as f64 / 1000.0;
            millis
        };
        Percentiles {
            samples: micros.len() as u64,
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: rank(1.0),
        }
    }
}

/// CPU time (user + system) of process `pid` so far, in seconds; `None` when it is gone.
pub fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis are
    // plain: state is field 3, utime field 14, stime field 15.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// Peak resident memory of process `pid` (VmHWM), in MB; `None` when it is gone.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kilobytes: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kilobytes / 1024.0)
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 on Linux when that
/// cannot be asked).
pub fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The CPU model and the number of cores, from `/proc/cpuinfo`.
pub fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim())
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    format!("{cores} cores, {model}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let percentiles = Percentiles::of_micros((1..=100).map(|n| n * 1000).collect());
        assert_eq!(percentiles.samples, 100);
        assert!((percentiles.p50 - 50.0).abs() < 1e-9);
        assert!((percentiles.p95 - 95.0).abs() < 1e-9);
        assert!((percentiles.p99 - 99.0).abs() < 1e-9);
        assert!((percentiles.max - 100.0).abs() < 1e-9);
        assert_eq!(Percentiles::of_micros(Vec::new()).samples, 0);
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid, ticks_per_second()).is_some());
        assert!(peak_rss_mb(pid).is_some_and(|mb| mb > 0.0));
    }
}
