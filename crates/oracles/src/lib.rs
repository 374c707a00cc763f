//! Oracles label samples valid or invalid.
//!
//! An oracle is plain Rust over `&[f32]` rows: no tensor library is needed to write one,
//! and a closure is an oracle ([`from_fn`]). Each [`Verdict`] says which of the oracle's
//! named constraints a sample breaks.
//!
//! * [`Checkerboard`]: the Gen-neG toy (off the board, black square).
//! * [`scene`]: traffic scenes — vehicles as oriented rectangles on a road raster,
//!   judged per vehicle for collision (separating axes) and offroad.
//! * [`motion`]: human motion in HumanML3D's layout — joint positions from features, ground
//!   penetration per frame ([`motion::GroundOracle`]), foot skating.
//!
//! ```
//! use scoreguide_oracles::{Checkerboard, Oracle};
//! let board = Checkerboard::default(); // 4×4 squares on [−4, 4]²
//! assert!(board.check(&[0.5, 0.5]).valid);   // ⌊0.25⌋ + ⌊0.25⌋ = 0: white
//! assert!(!board.check(&[-0.5, 0.5]).valid); // black square
//! assert!(!board.check(&[5.0, 1.0]).valid);  // off the board
//! let v = board.check_rows(&[0.5, 0.5, 2.5, 0.5], 2).unwrap();
//! assert_eq!(v.iter().filter(|v| v.valid).count(), 1);
//! ```

use std::fmt;

pub mod motion;
pub mod scene;
pub use scene::{check_scene, OrientedBox, RoadRaster, SceneOracle, SceneVerdict};

/// An oracle's judgement of one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    pub valid: bool,
    /// Bit i is set when constraint i of [`Oracle::constraints`] is broken.
    pub violations: u32,
}

impl Verdict {
    pub const VALID: Verdict = Verdict {
        valid: true,
        violations: 0,
    };

    /// A verdict from the set of broken constraints (valid iff none is).
    pub fn from_violations(violations: u32) -> Self {
        Self {
            valid: violations == 0,
            violations,
        }
    }

    pub fn breaks(&self, constraint: usize) -> bool {
        self.violations & (1 << constraint) != 0
    }
}

/// A bad oracle input: rows that do not fit the oracle's dimension, or NaN.
#[derive(Debug, Clone, PartialEq)]
pub struct OracleError(pub String);

impl fmt::Display for OracleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OracleError {}

/// Something that tells valid samples from invalid ones.
pub trait Oracle: Send + Sync {
    /// Number of values in one sample.
    fn dim(&self) -> usize;

    /// Names of the constraints, in the bit order of [`Verdict::violations`].
    fn constraints(&self) -> &[&'static str] {
        &["valid"]
    }

    /// Judges one sample of length [`Oracle::dim`].
    fn check(&self, x: &[f32]) -> Verdict;

    /// Judges `data` as rows of `dim` values.
    fn check_rows(&self, data: &[f32], dim: usize) -> Result<Vec<Verdict>, OracleError> {
        if dim != self.dim() {
            return Err(OracleError(format!(
                "oracle expects samples of dimension {}, got {dim}",
                self.dim()
            )));
        }
        if dim == 0 || data.len() % dim != 0 {
            return Err(OracleError(format!(
                "oracle input of {} values is not a whole number of rows of {dim}",
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(OracleError(format!(
                "oracle input holds a non-finite value in sample {}",
                i / dim
            )));
        }
        Ok(data.chunks_exact(dim).map(|r| self.check(r)).collect())
    }
}

/// An oracle from a closure returning `true` for valid samples.
pub fn from_fn<F: Fn(&[f32]) -> bool + Send + Sync>(dim: usize, f: F) -> FnOracle<F> {
    FnOracle { dim, f }
}

/// See [`from_fn`].
pub struct FnOracle<F> {
    dim: usize,
    f: F,
}

impl<F: Fn(&[f32]) -> bool + Send + Sync> Oracle for FnOracle<F> {
    fn dim(&self) -> usize {
        self.dim
    }
    fn check(&self, x: &[f32]) -> Verdict {
        Verdict::from_violations(u32::from(!(self.f)(x)))
    }
}

/// The Gen-neG checkerboard: `squares × squares` cells of side `2 half_width / squares`
/// on `[−half_width, half_width]²`; cell (i, j) is white iff i + j is even, counting
/// from the origin (for the default board: white iff ⌊x/2⌋ + ⌊y/2⌋ is even).
/// Valid means on a white cell inside the board.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Checkerboard {
    pub squares: usize,
    pub half_width: f64,
}

impl Default for Checkerboard {
    fn default() -> Self {
        Self {
            squares: 4,
            half_width: 4.0,
        }
    }
}

impl Checkerboard {
    pub const OFF_BOARD: usize = 0;
    pub const BLACK_SQUARE: usize = 1;

    pub fn side(&self) -> f64 {
        2.0 * self.half_width / self.squares as f64
    }

    /// Whether the point is on a white cell (ignoring the board's edge).
    pub fn is_white(&self, x: f64, y: f64) -> bool {
        let s = self.side();
        ((x / s).floor() as i64 + (y / s).floor() as i64).rem_euclid(2) == 0
    }

    pub fn on_board(&self, x: f64, y: f64) -> bool {
        let h = self.half_width;
        (-h..h).contains(&x) && (-h..h).contains(&y)
    }
}

impl Oracle for Checkerboard {
    fn dim(&self) -> usize {
        2
    }

    fn constraints(&self) -> &[&'static str] {
        &["off_board", "black_square"]
    }

    fn check(&self, p: &[f32]) -> Verdict {
        let (x, y) = (p[0] as f64, p[1] as f64);
        let mut v = 0;
        if !self.on_board(x, y) {
            v |= 1 << Self::OFF_BOARD;
        } else if !self.is_white(x, y) {
            v |= 1 << Self::BLACK_SQUARE;
        }
        Verdict::from_violations(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn moving_one_square_flips_colour(x in -3.9f64..1.9, y in -3.9f64..3.9) {
            let b = Checkerboard::default();
            // Stay away from cell edges, where rounding decides.
            prop_assume!((x / 2.0).fract().abs() > 1e-6 && (y / 2.0).fract().abs() > 1e-6);
            prop_assert_ne!(b.is_white(x, y), b.is_white(x + 2.0, y));
        }

        #[test]
        fn off_board_is_never_valid(x in 4.0f32..100.0, y in -100f32..100.0) {
            let b = Checkerboard::default();
            prop_assert!(!b.check(&[x, y]).valid);
            prop_assert!(!b.check(&[-x, y]).valid);
            prop_assert!(!b.check(&[y, x]).valid);
        }
    }

    #[test]
    fn rows_are_validated() {
        let b = Checkerboard::default();
        assert!(b.check_rows(&[0.5, 0.5, 1.0], 2).is_err());
        assert!(b
            .check_rows(&[0.5, f32::NAN], 2)
            .unwrap_err()
            .0
            .contains("non-finite"));
        assert!(b.check_rows(&[0.5, 0.5], 3).is_err());
    }

    #[test]
    fn closures_are_oracles() {
        let o = from_fn(1, |x: &[f32]| x[0] > 0.0);
        assert!(o.check(&[1.0]).valid);
        assert!(!o.check(&[-1.0]).valid);
    }
}
