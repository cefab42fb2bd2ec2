//! What the tests of the losses checked against reference implementations share: the fixed
//! input matrices their fixture scripts (tests/fixtures/*/reference.py) build, and the
//! comparison with the values those scripts printed.

/// sin(a·i + b·j + 0.3) for row i and column j: the scripts' `grid(rows, cols, a, b)`, a fixed,
/// irregular matrix (row-major).
pub fn grid(rows: usize, cols: usize, a: f64, b: f64) -> Vec<f32> {
    (0..rows)
        .flat_map(|i| (0..cols).map(move |j| (a * i as f64 + b * j as f64 + 0.3).sin() as f32))
        .collect()
}

/// Asserts that `got` (f32) matches the reference's f64 values `want` within 2e-5 relative
/// (1 + |want|), naming `what` and the index where it does not.
pub fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() < 2e-5 * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}
