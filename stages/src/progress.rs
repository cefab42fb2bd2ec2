//! What `pipeline status` says of every kind's progress alike: a duration put for a person, and
//! the time a stage has left at the pace its latest units of work (a label stage's chunks, a
//! replay stage's epochs) were written.

use std::path::Path;
use std::time::SystemTime;

/// `seconds` for a person: `40 s`, `12 min`, `3.5 h`, `2.1 days`.
pub fn rough(seconds: f64) -> String {
    match seconds {
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 90.0 * 60.0 => format!("{:.0} min", s / 60.0),
        s if s < 48.0 * 3600.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86_400.0),
    }
}

/// Gaps between consecutive writes whose median is the pace of the time left.
const PACE_GAPS: usize = 5;

/// Seconds that `remaining` more units take at the pace the units written at `times` were: the
/// median gap between consecutive ones of the last [`PACE_GAPS`] + 1. The median, not the mean,
/// so that the hours between a killed run and its resumption are not taken for the pace. `None`
/// with fewer than two times or nothing remaining.
pub fn left_at_pace(times: &[SystemTime], remaining: usize) -> Option<f64> {
    if remaining == 0 {
        return None;
    }
    let mut times = times.to_vec();
    times.sort();
    let recent = &times[times.len().saturating_sub(PACE_GAPS + 1)..];
    let mut gaps: Vec<f64> = recent
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default().as_secs_f64())
        .collect();
    if gaps.is_empty() {
        return None;
    }
    gaps.sort_by(f64::total_cmp);
    let mid = gaps.len() / 2;
    let median = if gaps.len() % 2 == 1 {
        gaps[mid]
    } else {
        (gaps[mid - 1] + gaps[mid]) / 2.0
    };
    Some(median * remaining as f64)
}

/// When the file at `path` was last written, if it can be read.
pub fn written(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(seconds: &[u64]) -> Vec<SystemTime> {
        seconds
            .iter()
            .map(|&s| SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s))
            .collect()
    }

    #[test]
    fn durations_read_in_the_unit_that_fits() {
        assert_eq!(rough(40.0), "40 s");
        assert_eq!(rough(89.0), "89 s");
        assert_eq!(rough(90.0), "2 min");
        assert_eq!(rough(720.0), "12 min");
        assert_eq!(rough(12_600.0), "3.5 h");
        assert_eq!(rough(181_440.0), "2.1 days");
    }

    /// Worked by hand: gaps are the differences of the sorted times, the median of the last
    /// five of them times the units left.
    #[test]
    fn the_pace_is_the_median_gap_of_the_latest_writes() {
        // Gaps 10, 10, 10: 4 left take 40 s; order of the times does not matter.
        assert_eq!(left_at_pace(&at(&[30, 0, 20, 10]), 4), Some(40.0));
        // A resumption 5,000 s after a kill: gaps 10, 5000, 12, 14, sorted 10, 12, 14, 5000,
        // median (12 + 14) / 2 = 13; 3 left take 39 s (the mean, 1259 s, would say 63 min).
        assert_eq!(left_at_pace(&at(&[0, 10, 5010, 5022, 5036]), 3), Some(39.0));
        // Only the last six times count: gaps 100, 100 of the oldest are dropped, the last
        // five are 1, 2, 3, 4, 5 → median 3.
        let t = at(&[0, 100, 200, 201, 203, 206, 210, 215]);
        assert_eq!(left_at_pace(&t, 2), Some(6.0));
        // One time, or nothing left: nothing to say.
        assert_eq!(left_at_pace(&at(&[5]), 3), None);
        assert_eq!(left_at_pace(&at(&[5, 9]), 0), None);
    }
}
