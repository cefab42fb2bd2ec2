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
/// lower median gap between consecutive ones of the last [`PACE_GAPS`] + 1, leaving out the gap
/// across `resumed` (when the run writing now started: the hours between a killed run and its
/// resumption are not the pace), and the lower median, not the mean, so that one slow gap does
/// not set it either. `None` with no gap left, nothing remaining, or a pace of 0 (writes closer
/// than the file system's clock).
pub fn left_at_pace(
    times: &[SystemTime],
    remaining: usize,
    resumed: Option<SystemTime>,
) -> Option<f64> {
    if remaining == 0 {
        return None;
    }
    let mut times = times.to_vec();
    times.sort();
    let recent = &times[times.len().saturating_sub(PACE_GAPS + 1)..];
    let mut gaps: Vec<f64> = recent
        .windows(2)
        .filter(|w| resumed.is_none_or(|r| !(w[0] < r && r <= w[1])))
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default().as_secs_f64())
        .collect();
    if gaps.is_empty() {
        return None;
    }
    gaps.sort_by(f64::total_cmp);
    let pace = gaps[(gaps.len() - 1) / 2];
    (pace > 0.0).then_some(pace * remaining as f64)
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

    /// Worked by hand: gaps are the differences of the sorted times, the lower median of the
    /// last five of them (the one across the resumption left out) times the units left.
    #[test]
    fn the_pace_is_the_median_gap_of_the_latest_writes() {
        // Gaps 10, 10, 10: 4 left take 40 s; the order of the times does not matter.
        assert_eq!(left_at_pace(&at(&[30, 0, 20, 10]), 4, None), Some(40.0));
        // Gaps 10, 5000, 12, 14 sorted 10, 12, 14, 5000: lower median 12, 3 left take 36 s
        // (the mean, 1259 s, would say 63 min).
        let t = at(&[0, 10, 5010, 5022, 5036]);
        assert_eq!(left_at_pace(&t, 3, None), Some(36.0));
        // Resumed at 5005: the gap 10 → 5010 goes; 10, 12, 14 give 12.
        let resumed = at(&[5005])[0];
        assert_eq!(left_at_pace(&t, 3, Some(resumed)), Some(36.0));
        // Two writes, a kill, one write after the resumption: gaps 30 and 7200 → 30 (the
        // resumption's gap left out), 2 left take 60 s; without knowing the resumption, the
        // lower median is 30 too.
        let t = at(&[0, 30, 7230]);
        assert_eq!(left_at_pace(&t, 2, Some(at(&[7000])[0])), Some(60.0));
        assert_eq!(left_at_pace(&t, 2, None), Some(60.0));
        // The only gap is across the resumption: nothing to go by.
        let t = at(&[0, 7230]);
        assert_eq!(left_at_pace(&t, 2, Some(at(&[7000])[0])), None);
        // Only the last six times count: gaps 100, 100 of the oldest are dropped, the last
        // five are 1, 2, 3, 4, 5 → median 3.
        let t = at(&[0, 100, 200, 201, 203, 206, 210, 215]);
        assert_eq!(left_at_pace(&t, 2, None), Some(6.0));
        // One time, nothing left, or writes in the same clock tick: nothing to say.
        assert_eq!(left_at_pace(&at(&[5]), 3, None), None);
        assert_eq!(left_at_pace(&at(&[5, 9]), 0, None), None);
        assert_eq!(left_at_pace(&at(&[5, 5, 5]), 2, None), None);
    }
}
