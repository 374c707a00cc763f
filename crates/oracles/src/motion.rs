//! Human motion on flat ground: the skeleton and feature layout shared with HumanML3D,
//! recovering joint positions from features, and the ground-penetration oracle.
//!
//! A motion is `frames` rows of [`FEATURES`] values in HumanML3D's layout without its
//! joint rotations and local velocities:
//! `[root yaw velocity (half-angle, rad/frame), root velocity x, z (m/frame, in the
//! root's facing frame), root height y, 21 × (x, y, z) joint positions relative to the
//! root in its facing frame (y absolute), 4 foot contacts (left ankle, left toe, right
//! ankle, right toe)]`. HumanML3D's 263 features hold these in columns 0–66 and 259–262.
//! The ground is the plane y = 0.
//!
//! ```
//! use scoreguide_oracles::motion::{GroundOracle, FEATURES, JOINTS};
//! // One standing frame with every joint 1 m up, then the same frame 3 cm under ground.
//! let mut motion = vec![0.0f32; 2 * FEATURES];
//! for (t, y) in [(0, 1.0f32), (1, -0.03)] {
//!     let frame = &mut motion[t * FEATURES..(t + 1) * FEATURES];
//!     frame[3] = y;
//!     for j in 1..JOINTS { frame[4 + 3 * (j - 1) + 1] = y; }
//! }
//! let verdict = GroundOracle { tolerance: 0.02 }.check(&motion, 2).unwrap();
//! assert_eq!(verdict.penetrating, vec![false, true]);
//! assert!((verdict.deepest - 0.03).abs() < 1e-6);
//! ```

use crate::OracleError;

/// Joints of HumanML3D's 22-joint SMPL skeleton.
pub const JOINTS: usize = 22;
/// Values per frame (see the module documentation).
pub const FEATURES: usize = 4 + 3 * (JOINTS - 1) + 4;
/// Frames per second of HumanML3D (and of the procedural stand-in).
pub const FPS: f64 = 20.0;
/// Each joint's parent (the root's is itself): SMPL's kinematic tree.
pub const PARENTS: [usize; JOINTS] = [
    0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19,
];
/// Joint names in SMPL order.
pub const JOINT_NAMES: [&str; JOINTS] = [
    "pelvis",
    "left_hip",
    "right_hip",
    "spine1",
    "left_knee",
    "right_knee",
    "spine2",
    "left_ankle",
    "right_ankle",
    "spine3",
    "left_foot",
    "right_foot",
    "neck",
    "left_collar",
    "right_collar",
    "head",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
];
/// The joints whose contacts the features record, in their order.
pub const FOOT_JOINTS: [usize; 4] = [7, 10, 8, 11];
/// Column of the root height.
pub const ROOT_Y: usize = 3;
/// First column of the joint positions.
pub const RIC: usize = 4;
/// First column of the foot contacts.
pub const CONTACTS: usize = RIC + 3 * (JOINTS - 1);
/// HumanML3D's feature columns that make ours, in order (`0..67` and `259..263`).
pub fn humanml3d_columns() -> Vec<usize> {
    (0..CONTACTS).chain(259..263).collect()
}

/// `v` rotated about the vertical axis by `angle` (right-handed: z turns towards x).
pub fn rotate_y(v: [f32; 3], angle: f32) -> [f32; 3] {
    let (s, c) = angle.sin_cos();
    [c * v[0] + s * v[2], v[1], -s * v[0] + c * v[2]]
}

fn check_len(features: &[f32], frames: usize, what: &str) -> Result<(), OracleError> {
    if frames == 0 || features.len() < frames * FEATURES {
        return Err(OracleError(format!(
            "{what}: need {frames} frames of {FEATURES} features ({} values), got {}",
            frames * FEATURES,
            features.len()
        )));
    }
    if let Some(i) = features[..frames * FEATURES]
        .iter()
        .position(|v| !v.is_finite())
    {
        return Err(OracleError(format!(
            "{what}: feature {} of frame {} is {}",
            i % FEATURES,
            i / FEATURES,
            features[i]
        )));
    }
    Ok(())
}

/// Height of each joint in one frame of features.
pub fn joint_heights(frame: &[f32]) -> [f32; JOINTS] {
    let mut y = [0.0; JOINTS];
    y[0] = frame[ROOT_Y];
    for (j, yj) in y.iter_mut().enumerate().skip(1) {
        *yj = frame[RIC + 3 * (j - 1) + 1];
    }
    y
}

/// World positions of every joint in each of the first `frames` frames (`frames × 22`),
/// integrating the root's velocities from the origin, facing +z, as HumanML3D's
/// `recover_from_ric`.
pub fn joint_positions(features: &[f32], frames: usize) -> Result<Vec<[f32; 3]>, OracleError> {
    check_len(features, frames, "joint positions")?;
    let mut out = Vec::with_capacity(frames * JOINTS);
    let (mut half_angle, mut root) = (0.0f32, [0.0f32; 2]);
    for t in 0..frames {
        let f = &features[t * FEATURES..(t + 1) * FEATURES];
        let to_world = |v: [f32; 3]| rotate_y(v, -2.0 * half_angle);
        out.push([root[0], f[ROOT_Y], root[1]]);
        for j in 1..JOINTS {
            let c = RIC + 3 * (j - 1);
            let p = to_world([f[c], f[c + 1], f[c + 2]]);
            out.push([p[0] + root[0], p[1], p[2] + root[1]]);
        }
        let v = to_world([f[1], 0.0, f[2]]);
        root = [root[0] + v[0], root[1] + v[2]];
        half_angle += f[0];
    }
    Ok(out)
}

/// One motion's judgement: which frames have a joint under the ground by more than the
/// tolerance, and the deepest joint (m below the ground; 0 when none is).
#[derive(Debug, Clone, PartialEq)]
pub struct MotionVerdict {
    pub penetrating: Vec<bool>,
    pub deepest: f32,
}

impl MotionVerdict {
    /// A motion infracts when any of its frames does.
    pub fn infracting(&self) -> bool {
        self.penetrating.iter().any(|&p| p)
    }

    pub fn penetrating_frames(&self) -> usize {
        self.penetrating.iter().filter(|&&p| p).count()
    }
}

/// Ground penetration (Gen-neG §4.3): a frame infracts when any joint is more than
/// `tolerance` metres below the ground plane y = 0, and a motion when any frame does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroundOracle {
    pub tolerance: f32,
}

impl GroundOracle {
    /// Judges the first `frames` frames of `features` (denormalised, metres).
    pub fn check(&self, features: &[f32], frames: usize) -> Result<MotionVerdict, OracleError> {
        check_len(features, frames, "ground oracle")?;
        let mut deepest = 0.0f32;
        let penetrating = (0..frames)
            .map(|t| {
                let lowest = joint_heights(&features[t * FEATURES..(t + 1) * FEATURES])
                    .into_iter()
                    .fold(f32::INFINITY, f32::min);
                deepest = deepest.max(-lowest);
                lowest < -self.tolerance
            })
            .collect();
        Ok(MotionVerdict {
            penetrating,
            deepest,
        })
    }
}

/// Foot skating as the motion-generation literature measures it (GMD, Karunratanakul et
/// al. 2023): of the frame pairs where a foot joint is within `contact_height` of the
/// ground at both ends, those in which it moves more than `max_step` horizontally.
/// Returns (skating, contact) pair counts over the four foot joints.
pub fn foot_skating(
    features: &[f32],
    frames: usize,
    contact_height: f32,
    max_step: f32,
) -> Result<(usize, usize), OracleError> {
    let pos = joint_positions(features, frames)?;
    let (mut skating, mut contact) = (0, 0);
    for t in 1..frames {
        for &j in &FOOT_JOINTS {
            let (a, b) = (pos[(t - 1) * JOINTS + j], pos[t * JOINTS + j]);
            if a[1] < contact_height && b[1] < contact_height {
                contact += 1;
                if (b[0] - a[0]).hypot(b[2] - a[2]) > max_step {
                    skating += 1;
                }
            }
        }
    }
    Ok((skating, contact))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A motion walking along a circle at constant speed: each frame's features from
    /// world positions, as the generator writes them.
    fn circle(frames: usize) -> (Vec<f32>, Vec<[f32; 3]>) {
        let (speed, turn) = (0.05f32, 0.1f32); // m and rad per frame
        let offsets: Vec<[f32; 3]> = (0..JOINTS)
            .map(|j| [0.1 * j as f32, 0.05 * j as f32, -0.02 * j as f32])
            .collect();
        let mut world = Vec::new();
        let mut features = Vec::new();
        let (mut heading, mut root) = (0.0f32, [0.0f32, 0.0]);
        for _ in 0..frames {
            for off in &offsets {
                let p = rotate_y(*off, heading);
                world.push([p[0] + root[0], 0.9 + p[1], p[2] + root[1]]);
            }
            let step = rotate_y([0.0, 0.0, speed], heading);
            let mut f = vec![0.0f32; FEATURES];
            f[0] = -turn / 2.0;
            let local = rotate_y(step, -heading);
            f[1] = local[0];
            f[2] = local[2];
            f[ROOT_Y] = 0.9 + offsets[0][1];
            for (j, o) in offsets.iter().enumerate().skip(1) {
                let c = RIC + 3 * (j - 1);
                f[c..c + 3].copy_from_slice(&[o[0], 0.9 + o[1], o[2]]);
            }
            features.extend(f);
            root = [root[0] + step[0], root[1] + step[2]];
            heading += turn;
        }
        (features, world)
    }

    #[test]
    fn positions_are_recovered_from_velocities() {
        let (features, world) = circle(30);
        let pos = joint_positions(&features, 30).unwrap();
        for (p, w) in pos.iter().zip(&world) {
            for k in 0..3 {
                assert!((p[k] - w[k]).abs() < 1e-4, "{p:?} vs {w:?}");
            }
        }
    }

    #[test]
    fn humanml3d_columns_pick_our_layout() {
        let cols = humanml3d_columns();
        assert_eq!(cols.len(), FEATURES);
        assert_eq!((cols[66], cols[67], cols[70]), (66, 259, 262));
    }

    #[test]
    fn skating_counts_moving_feet_in_contact() {
        // Every joint 1 cm up and the root sliding 5 cm per frame: all four feet skate.
        let mut f = vec![0.0f32; 5 * FEATURES];
        for t in 0..5 {
            let frame = &mut f[t * FEATURES..(t + 1) * FEATURES];
            frame[2] = 0.05;
            frame[ROOT_Y] = 0.01;
            for j in 1..JOINTS {
                frame[RIC + 3 * (j - 1) + 1] = 0.01;
            }
        }
        assert_eq!(foot_skating(&f, 5, 0.05, 0.025).unwrap(), (16, 16));
        assert_eq!(foot_skating(&f, 5, 0.05, 0.1).unwrap(), (0, 16));
    }

    #[test]
    fn bad_input_is_named() {
        let mut f = vec![0.0f32; FEATURES];
        let e = GroundOracle { tolerance: 0.0 }.check(&f, 2).unwrap_err();
        assert!(e.0.contains("2 frames"), "{e}");
        f[5] = f32::NAN;
        let e = GroundOracle { tolerance: 0.0 }.check(&f, 1).unwrap_err();
        assert!(e.0.contains("feature 5 of frame 0"), "{e}");
    }
}
