//! Stick-figure strips: a motion as a row of poses seen from the side.

use crate::plot::{Canvas, BLACK, BLUE, GREY, RED};
use scoreguide_oracles::motion::{FEATURES, JOINTS, PARENTS, RIC, ROOT_Y};

/// Poses drawn per strip.
pub const POSES: usize = 6;

/// One motion (features, denormalised; `len` real frames) as `POSES` side views of its
/// body frame (forward to the right, up), spread over its length and placed 0.9 m apart,
/// with the ground line; joints more than `tolerance` under the ground in red.
pub fn motion_strip(features: &[f32], len: usize, tolerance: f32, title: &str) -> Canvas {
    let spacing = 0.9;
    let mut c = Canvas::new(720, 210, (-0.6, spacing * POSES as f64 - 0.3), (-0.25, 2.0));
    c.axes(title, &[], &[0.0, 1.0]);
    c.line((-0.6, 0.0), (spacing * POSES as f64 - 0.3, 0.0), GREY, 2);
    for p in 0..POSES {
        let t = if POSES > 1 && len > 1 {
            p * (len - 1) / (POSES - 1)
        } else {
            0
        };
        let f = &features[t * FEATURES..(t + 1) * FEATURES];
        let joint = |j: usize| -> (f64, f64) {
            let (z, y) = if j == 0 {
                (0.0, f[ROOT_Y])
            } else {
                let k = RIC + 3 * (j - 1);
                (f[k + 2], f[k + 1])
            };
            (spacing * p as f64 + z as f64, y as f64)
        };
        for (j, &parent) in PARENTS.iter().enumerate().skip(1) {
            let (a, b) = (joint(parent), joint(j));
            c.line(a, b, BLUE, 2);
        }
        for j in 0..JOINTS {
            let (z, y) = joint(j);
            let under = (y as f32) < -tolerance;
            c.dot(
                z,
                y,
                if under { 4.0 } else { 2.0 },
                if under { RED } else { BLACK },
                1.0,
            );
        }
        let (px, _) = c.to_px(spacing * p as f64, -0.25);
        c.text(px as i64 - 12, 178, &format!("{t:>3}"), 1, BLACK);
    }
    c
}
