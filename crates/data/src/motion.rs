//! Human motions on flat ground: a procedural, seeded stand-in for HumanML3D, the reader
//! for HumanML3D's own files, and feature standardisation.
//!
//! [`MotionSet::generate`] builds each motion by forward kinematics on HumanML3D's
//! 22-joint SMPL skeleton (bone lengths of an average adult, scaled per subject) from
//! joint-angle curves of one of six actions ([`Action`]): walking, running, jumping,
//! turning, sitting down and standing up. The body's lowest joint is put on the ground
//! in every frame it is supported (so nothing in the data penetrates the ground), a
//! supporting foot stays where it was planted (the root's travel comes from the stance
//! foot, so contacts are timed by the gait and feet do not skate), and running and
//! jumping leave the ground in flight phases. Motions are 20 fps, of random length up to
//! a maximum, in the feature layout of [`scoreguide_oracles::motion`] (HumanML3D's
//! without rotations and local velocities), padded with zeros past their length.
//! Each motion's action label stands in for HumanML3D's text.
//!
//! ```
//! use scoreguide_data::motion::{MotionConfig, MotionSet};
//! use scoreguide_oracles::motion::{GroundOracle, FEATURES};
//! let cfg = MotionConfig { frames: 40, min_frames: 30 };
//! let set = MotionSet::generate(&cfg, 12, 0)?;
//! assert_eq!(set.features.len(), 12 * 40 * FEATURES);
//! // Nothing in the data goes under the ground.
//! let oracle = GroundOracle { tolerance: 1e-4 };
//! for i in 0..set.len() {
//!     let v = oracle.check(set.motion(i), set.lengths[i]).unwrap();
//!     assert!(!v.infracting());
//! }
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scoreguide_oracles::motion::{
    rotate_y, CONTACTS, FEATURES, FOOT_JOINTS, FPS, JOINTS, PARENTS, RIC, ROOT_Y,
};
use scoreguide_sde::derive_seed;
use serde::{Deserialize, Serialize};
use std::f32::consts::PI;
use std::path::Path;

/// The actions of the procedural motions (the stand-in for HumanML3D's captions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Walk,
    Run,
    Jump,
    Turn,
    SitDown,
    StandUp,
}

impl Action {
    pub const ALL: [Action; 6] = [
        Action::Walk,
        Action::Run,
        Action::Jump,
        Action::Turn,
        Action::SitDown,
        Action::StandUp,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Walk => "walk",
            Self::Run => "run",
            Self::Jump => "jump",
            Self::Turn => "turn",
            Self::SitDown => "sit down",
            Self::StandUp => "stand up",
        }
    }
}

/// Sizes of a procedural motion set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MotionConfig {
    /// Frames of the longest motion (every motion is padded to it).
    pub frames: usize,
    /// Frames of the shortest.
    pub min_frames: usize,
}

impl MotionConfig {
    pub fn validate(&self) -> Result<()> {
        if self.min_frames < 2 || self.min_frames > self.frames {
            bail!(
                "motion set: need 2 <= min_frames <= frames, got min_frames {} and frames {}",
                self.min_frames,
                self.frames
            );
        }
        Ok(())
    }
}

/// Motions padded to `frames` frames: `features` holds `len() × frames × FEATURES`
/// values (zeros past each motion's length), `lengths` the real frames of each and
/// `actions` its label (an index of [`Action::ALL`], or of a user's own labels).
#[derive(Debug, Clone, PartialEq)]
pub struct MotionSet {
    pub frames: usize,
    pub features: Vec<f32>,
    pub lengths: Vec<usize>,
    pub actions: Vec<u32>,
}

/// Rest offsets of each joint from its parent (m; x left, y up, z forward), arms down.
const OFFSETS: [[f32; 3]; JOINTS] = [
    [0.0, 0.0, 0.0],
    [0.07, -0.09, 0.0],
    [-0.07, -0.09, 0.0],
    [0.0, 0.11, -0.01],
    [0.0, -0.38, 0.0],
    [0.0, -0.38, 0.0],
    [0.0, 0.13, 0.0],
    [0.0, -0.40, -0.02],
    [0.0, -0.40, -0.02],
    [0.0, 0.05, 0.02],
    [0.0, -0.06, 0.13],
    [0.0, -0.06, 0.13],
    [0.0, 0.21, -0.02],
    [0.07, 0.12, -0.01],
    [-0.07, 0.12, -0.01],
    [0.0, 0.09, 0.05],
    [0.11, 0.0, -0.01],
    [-0.11, 0.0, -0.01],
    [0.0, -0.26, 0.0],
    [0.0, -0.26, 0.0],
    [0.0, -0.25, 0.0],
    [0.0, -0.25, 0.0],
];

/// One frame's pose: a flexion angle per joint (rad, about the joint's x axis: positive
/// pitches a downward bone backwards), the yaw of the body, and how far it is off the
/// ground (flight).
#[derive(Clone, Copy)]
struct Pose {
    angle: [f32; JOINTS],
    clearance: f32,
}

impl Pose {
    fn standing() -> Self {
        Self {
            angle: [0.0; JOINTS],
            clearance: 0.0,
        }
    }

    /// Legs (hip flexion forward, knee flexion, ankle dorsiflexion) of one side.
    fn leg(&mut self, left: bool, hip: f32, knee: f32, ankle: f32) {
        let (h, k, a) = if left { (1, 4, 7) } else { (2, 5, 8) };
        self.angle[h] = -hip;
        self.angle[k] = knee;
        self.angle[a] = -ankle;
    }

    /// Arms (shoulder flexion forward, elbow flexion) of one side.
    fn arm(&mut self, left: bool, shoulder: f32, elbow: f32) {
        let (s, e) = if left { (16, 18) } else { (17, 19) };
        self.angle[s] = -shoulder;
        self.angle[e] = -elbow;
    }

    /// Forward lean of the trunk, spread over the three spine joints.
    fn lean(&mut self, lean: f32) {
        for j in [3, 6, 9] {
            self.angle[j] = lean / 3.0;
        }
    }
}

/// Joint positions of `pose` relative to the root, facing +z, for a subject of `scale`.
fn forward_kinematics(pose: &Pose, scale: f32) -> [[f32; 3]; JOINTS] {
    let mut pos = [[0.0f32; 3]; JOINTS];
    let mut global = [0.0f32; JOINTS];
    global[0] = pose.angle[0];
    for j in 1..JOINTS {
        let p = PARENTS[j];
        // Every rotation is about x, so a parent's orientation is one angle.
        let (s, c) = global[p].sin_cos();
        let o = OFFSETS[j];
        pos[j] = [
            pos[p][0] + scale * o[0],
            pos[p][1] + scale * (c * o[1] - s * o[2]),
            pos[p][2] + scale * (s * o[1] + c * o[2]),
        ];
        global[j] = global[p] + pose.angle[j];
    }
    pos
}

fn smoothstep(x: f32) -> f32 {
    let x = x.clamp(0.0, 1.0);
    x * x * (3.0 - 2.0 * x)
}

/// Joint angles, yaw rate and flight of one procedural motion, frame by frame.
struct Script {
    action: Action,
    frames: usize,
    rng: StdRng,
}

impl Script {
    fn u(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.rng.random::<f32>()
    }

    /// Poses, yaw per frame (rad) and horizontal speed in flight (m/s).
    fn poses(&mut self) -> (Vec<Pose>, Vec<f32>, f32) {
        let n = self.frames;
        let dt = 1.0 / FPS as f32;
        let mut poses = vec![Pose::standing(); n];
        let mut yaw = vec![0.0f32; n];
        let mut flight_speed = 0.0;
        match self.action {
            Action::Walk | Action::Turn | Action::Run => {
                let run = self.action == Action::Run;
                let freq = if run {
                    self.u(1.3, 1.5)
                } else {
                    self.u(0.8, 1.0)
                };
                let hip = if run {
                    self.u(0.55, 0.75)
                } else {
                    self.u(0.3, 0.45)
                };
                let knee = if run {
                    self.u(1.2, 1.6)
                } else {
                    self.u(0.6, 0.9)
                };
                let lean = if run {
                    self.u(0.15, 0.3)
                } else {
                    self.u(0.0, 0.08)
                };
                let elbow = if run {
                    self.u(1.2, 1.6)
                } else {
                    self.u(0.2, 0.4)
                };
                let flight = if run { self.u(0.03, 0.07) } else { 0.0 };
                let rate = match self.action {
                    Action::Turn => self.u(0.6, 1.4) * if self.rng.random() { 1.0 } else { -1.0 },
                    _ => self.u(-0.1, 0.1),
                };
                let phase0 = self.u(0.0, 2.0 * PI);
                for (t, pose) in poses.iter_mut().enumerate() {
                    let phase = 2.0 * PI * freq * t as f32 * dt + phase0;
                    for (left, offset) in [(true, 0.0), (false, PI)] {
                        let p = phase + offset;
                        let swing = (p + 0.3).cos().max(0.0);
                        pose.leg(
                            left,
                            hip * p.sin(),
                            if run { 0.3 } else { 0.08 } + knee * swing * swing,
                            0.2 * swing,
                        );
                        pose.arm(left, -0.8 * hip * p.sin(), elbow + 0.1 * p.cos());
                    }
                    pose.lean(lean);
                    // Flight: the third of each step after push-off.
                    pose.clearance = flight * ((2.0 * phase).sin() - 0.5).max(0.0) / 0.5;
                    yaw[t] = rate * t as f32 * dt;
                }
            }
            Action::Jump => {
                let height = self.u(0.15, 0.4);
                flight_speed = self.u(0.0, 1.2);
                let air = 2.0 * (2.0 * height / 9.81).sqrt();
                let (crouch, push, land) = (self.u(0.35, 0.5), 0.15, self.u(0.3, 0.45));
                let mut start = self.u(0.1, 0.6);
                let cycle = crouch + push + air + land + self.u(0.2, 0.5);
                for (t, pose) in poses.iter_mut().enumerate() {
                    let mut s = t as f32 * dt - start;
                    if s > cycle {
                        start += cycle;
                        s -= cycle;
                    }
                    // Crouch depth c and arm swing: down, extend, fly, land, recover.
                    let (c, arms, fly) = if s < 0.0 {
                        (0.0, 0.0, 0.0)
                    } else if s < crouch {
                        let x = smoothstep(s / crouch);
                        (x, -0.8 * x, 0.0)
                    } else if s < crouch + push {
                        let x = smoothstep((s - crouch) / push);
                        (1.0 - x, -0.8 + 2.8 * x, 0.0)
                    } else if s < crouch + push + air {
                        let a = s - crouch - push;
                        (0.0, 2.0 - a / air, (air / 2.0) * 9.81 * a - 4.905 * a * a)
                    } else if s < crouch + push + air + land {
                        let x = (s - crouch - push - air) / land;
                        ((PI * x).sin() * 0.8, 1.0 * (1.0 - x), 0.0)
                    } else {
                        (0.0, 0.0, 0.0)
                    };
                    for left in [true, false] {
                        pose.leg(left, 1.0 * c, 1.8 * c, -0.8 * c);
                        pose.arm(left, arms, 0.3);
                    }
                    pose.lean(0.5 * c);
                    pose.clearance = fly.max(0.0);
                }
            }
            Action::SitDown | Action::StandUp => {
                let total = n as f32 * dt;
                let duration = self.u(1.2, 2.0).min(0.8 * total);
                let begin = self.u(0.0, total - duration);
                let depth = self.u(1.35, 1.6);
                for (t, pose) in poses.iter_mut().enumerate() {
                    let mut x = smoothstep((t as f32 * dt - begin) / duration);
                    if self.action == Action::StandUp {
                        x = 1.0 - x;
                    }
                    for left in [true, false] {
                        pose.leg(left, depth * x, depth * x, 0.0);
                        pose.arm(left, 0.4 * x, 0.5 * x);
                    }
                    // The trunk leans forward while the weight shifts, upright when seated.
                    let moving = (PI * x).sin();
                    pose.lean(0.6 * moving + 0.1 * x);
                }
            }
        }
        (poses, yaw, flight_speed)
    }
}

/// One motion of `frames` frames as features (see the module documentation).
fn motion_features(action: Action, frames: usize, seed: u64) -> Vec<f32> {
    let mut script = Script {
        action,
        frames,
        rng: StdRng::seed_from_u64(seed),
    };
    let scale = script.u(0.88, 1.12);
    let (poses, yaw, flight_speed) = script.poses();
    let dt = 1.0 / FPS as f32;
    // Joint positions relative to the root (body frame), the root's height, its travel.
    let local: Vec<[[f32; 3]; JOINTS]> =
        poses.iter().map(|p| forward_kinematics(p, scale)).collect();
    let height: Vec<f32> = local
        .iter()
        .zip(&poses)
        .map(|(l, p)| -l.iter().map(|q| q[1]).fold(f32::INFINITY, f32::min) + p.clearance)
        .collect();
    let mut root = vec![[0.0f32; 2]; frames];
    let mut velocity = [0.0f32; 2];
    for t in 0..frames - 1 {
        let world = |t: usize, j: usize| rotate_y(local[t][j], yaw[t]);
        velocity = if poses[t].clearance > 0.0 || poses[t + 1].clearance > 0.0 {
            if action == Action::Jump {
                let d = rotate_y([0.0, 0.0, flight_speed * dt], yaw[t]);
                [d[0], d[2]]
            } else {
                velocity
            }
        } else {
            // The lowest foot joint carries the body: it stays where it is.
            let c = *FOOT_JOINTS
                .iter()
                .min_by(|&&a, &&b| local[t][a][1].total_cmp(&local[t][b][1]))
                .expect("four foot joints");
            let (a, b) = (world(t, c), world(t + 1, c));
            [a[0] - b[0], a[2] - b[2]]
        };
        root[t + 1] = [root[t][0] + velocity[0], root[t][1] + velocity[1]];
    }
    let mut out = vec![0.0f32; frames * FEATURES];
    for t in 0..frames {
        let f = &mut out[t * FEATURES..(t + 1) * FEATURES];
        let next = (t + 1).min(frames - 1);
        let step = if t + 1 < frames {
            [root[next][0] - root[t][0], root[next][1] - root[t][1]]
        } else {
            velocity
        };
        let yaw_step = if t + 1 < frames {
            yaw[next] - yaw[t]
        } else {
            yaw[t] - yaw[t.saturating_sub(1)]
        };
        f[0] = -yaw_step / 2.0;
        let v = rotate_y([step[0], 0.0, step[1]], -yaw[t]);
        f[1] = v[0];
        f[2] = v[2];
        f[ROOT_Y] = height[t];
        for (j, p) in local[t].iter().enumerate().skip(1) {
            let c = RIC + 3 * (j - 1);
            f[c..c + 3].copy_from_slice(&[p[0], p[1] + height[t], p[2]]);
        }
        // HumanML3D's contact rule: a foot joint moving under √0.002 m per frame.
        for (k, &j) in FOOT_JOINTS.iter().enumerate() {
            let (a, b) = (t.min(frames - 2), t.min(frames - 2) + 1);
            let pa = rotate_y(local[a][j], yaw[a]);
            let pb = rotate_y(local[b][j], yaw[b]);
            let d = [
                pb[0] + root[b][0] - pa[0] - root[a][0],
                pb[1] + height[b] - pa[1] - height[a],
                pb[2] + root[b][1] - pa[2] - root[a][1],
            ];
            f[CONTACTS + k] = f32::from(d[0] * d[0] + d[1] * d[1] + d[2] * d[2] < 0.002);
        }
    }
    out
}

impl MotionSet {
    /// `n` procedural motions (actions in turn, lengths and everything else random), each
    /// from its own seed `derive_seed(seed, i)`: the same `(seed, i)` gives the same
    /// motion whatever `n` is.
    pub fn generate(cfg: &MotionConfig, n: usize, seed: u64) -> Result<Self> {
        cfg.validate()?;
        if n == 0 {
            bail!("motion set: asked for no motions");
        }
        let mut set = Self {
            frames: cfg.frames,
            features: vec![0.0; n * cfg.frames * FEATURES],
            lengths: Vec::with_capacity(n),
            actions: Vec::with_capacity(n),
        };
        for i in 0..n {
            let s = derive_seed(seed, i as u64);
            let mut rng = StdRng::seed_from_u64(s);
            let action = Action::ALL[rng.random_range(0..Action::ALL.len())];
            let len = rng.random_range(cfg.min_frames..=cfg.frames);
            let m = motion_features(action, len, derive_seed(s, 1));
            let start = i * cfg.frames * FEATURES;
            set.features[start..start + m.len()].copy_from_slice(&m);
            set.lengths.push(len);
            set.actions.push(action as u32);
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Values per motion row (`frames × FEATURES`).
    pub fn row_dim(&self) -> usize {
        self.frames * FEATURES
    }

    /// Motion `i`, padded.
    pub fn motion(&self, i: usize) -> &[f32] {
        &self.features[i * self.row_dim()..(i + 1) * self.row_dim()]
    }

    /// Frame masks `[len(), frames]` (1 for a real frame).
    pub fn masks(&self, idx: &[u32], device: &Device) -> Result<Tensor> {
        let f = self.frames;
        let mut m = vec![0f32; idx.len() * f];
        for (r, &i) in idx.iter().enumerate() {
            let len = *self.lengths.get(i as usize).ok_or_else(|| {
                candle_core::Error::msg(format!(
                    "motion {i} asked of a set of {} motions",
                    self.len()
                ))
            })?;
            m[r * f..r * f + len].fill(1.0);
        }
        Tensor::from_vec(m, (idx.len(), f), device)
    }

    /// Reads HumanML3D (`new_joint_vecs/<id>.npy`, `[T, 263]` each) for the ids listed
    /// in `dir/<split>.txt`, keeping our feature columns
    /// ([`scoreguide_oracles::motion::humanml3d_columns`]), cropping motions to `frames`
    /// and skipping those shorter than `min_frames` (as HumanML3D's loader does). Labels
    /// are 0: HumanML3D's conditions are texts, which this reader does not encode.
    pub fn humanml3d(dir: &Path, split: &str, cfg: &MotionConfig) -> Result<Self> {
        cfg.validate()?;
        let list = dir.join(format!("{split}.txt"));
        let ids = std::fs::read_to_string(&list).map_err(|e| {
            candle_core::Error::msg(format!(
                "HumanML3D: cannot read the split list {} ({e}); point at the folder that holds \
                 {split}.txt and new_joint_vecs/ (HumanML3D's own layout)",
                list.display()
            ))
        })?;
        let mut set = Self {
            frames: cfg.frames,
            features: Vec::new(),
            lengths: Vec::new(),
            actions: Vec::new(),
        };
        for id in ids.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let path = dir.join("new_joint_vecs").join(format!("{id}.npy"));
            let bytes = std::fs::read(&path).map_err(|e| {
                candle_core::Error::msg(format!("HumanML3D: {} ({e})", path.display()))
            })?;
            let Some((row, len)) = humanml3d_motion(&bytes, &path.display().to_string(), cfg)?
            else {
                continue;
            };
            set.features.extend(row);
            set.lengths.push(len);
            set.actions.push(0);
        }
        if set.is_empty() {
            bail!(
                "HumanML3D: no motion of at least {} frames listed in {}",
                cfg.min_frames,
                list.display()
            );
        }
        Ok(set)
    }
}

/// One HumanML3D motion file's bytes (`new_joint_vecs/<id>.npy`, `[T, 263]`; `what`
/// names it in errors): our columns of its first `cfg.frames` frames, padded, and its
/// length; `None` for a motion shorter than `cfg.min_frames`.
pub fn humanml3d_motion(
    bytes: &[u8],
    what: &str,
    cfg: &MotionConfig,
) -> Result<Option<(Vec<f32>, usize)>> {
    let a = scoreguide_metrics::read_npy(bytes)
        .map_err(|e| candle_core::Error::msg(format!("HumanML3D: {what}: {e}")))?;
    if a.cols != 263 {
        bail!(
            "HumanML3D: {what} has {} features per frame, expected 263",
            a.cols
        );
    }
    if a.rows < cfg.min_frames {
        return Ok(None);
    }
    let len = a.rows.min(cfg.frames);
    let mut row = vec![0f32; cfg.frames * FEATURES];
    for (k, c) in scoreguide_oracles::motion::humanml3d_columns()
        .into_iter()
        .enumerate()
    {
        for t in 0..len {
            row[t * FEATURES + k] = a.data[t * 263 + c] as f32;
        }
    }
    if let Some(i) = row.iter().position(|v| !v.is_finite()) {
        bail!(
            "HumanML3D: {what} holds {} at frame {}",
            row[i],
            i / FEATURES
        );
    }
    Ok(Some((row, len)))
}

/// Per-feature mean and standard deviation over the real frames of a set: what the
/// models see is `(features − mean) / std`, and zero past a motion's length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalizer {
    /// Statistics of `set`'s real frames, each std at least `min_std` (contacts and
    /// velocities of still motions would otherwise divide by ~0).
    pub fn fit(set: &MotionSet, min_std: f32) -> Result<Self> {
        let frames: usize = set.lengths.iter().sum();
        if frames < 2 {
            bail!("motion statistics: need at least 2 frames, got {frames}");
        }
        let mut sum = vec![0f64; FEATURES];
        let mut sq = vec![0f64; FEATURES];
        for i in 0..set.len() {
            for frame in set.motion(i).chunks(FEATURES).take(set.lengths[i]) {
                for (k, &v) in frame.iter().enumerate() {
                    sum[k] += v as f64;
                    sq[k] += (v as f64) * (v as f64);
                }
            }
        }
        let n = frames as f64;
        let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        let std = sq
            .iter()
            .zip(&sum)
            .map(|(q, s)| ((q / n - (s / n).powi(2)).max(0.0).sqrt() as f32).max(min_std))
            .collect();
        Ok(Self { mean, std })
    }

    /// HumanML3D's `Mean.npy` and `Std.npy` (263 values each), our columns of them.
    pub fn humanml3d(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Vec<f32>> {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| {
                candle_core::Error::msg(format!("HumanML3D: {} ({e})", path.display()))
            })?;
            let v = scoreguide_metrics::read_npy_vector(&bytes).map_err(|e| {
                candle_core::Error::msg(format!("HumanML3D: {}: {e}", path.display()))
            })?;
            if v.len() != 263 {
                bail!(
                    "HumanML3D: {} holds {} values, expected 263",
                    path.display(),
                    v.len()
                );
            }
            Ok(scoreguide_oracles::motion::humanml3d_columns()
                .iter()
                .map(|&c| v[c] as f32)
                .collect())
        };
        let n = Self {
            mean: read("Mean.npy")?,
            std: read("Std.npy")?,
        };
        if n.std.iter().any(|s| !(*s > 0.0)) {
            bail!(
                "HumanML3D: {} has a zero or negative std",
                dir.join("Std.npy").display()
            );
        }
        Ok(n)
    }

    /// Rows `idx` of `set`, standardised, `[idx.len(), frames × FEATURES]`.
    pub fn rows(&self, set: &MotionSet, idx: &[u32], device: &Device) -> Result<Tensor> {
        let d = set.row_dim();
        let mut out = vec![0f32; idx.len() * d];
        for (r, &i) in idx.iter().enumerate() {
            let i = i as usize;
            if i >= set.len() {
                bail!("motion {i} asked of a set of {} motions", set.len());
            }
            let row = &mut out[r * d..(r + 1) * d];
            for (t, frame) in set.motion(i).chunks(FEATURES).enumerate() {
                if t >= set.lengths[i] {
                    break;
                }
                for k in 0..FEATURES {
                    row[t * FEATURES + k] = (frame[k] - self.mean[k]) / self.std[k];
                }
            }
        }
        Tensor::from_vec(out, (idx.len(), d), device)
    }

    /// Standardised rows back to features (every frame, padding included).
    pub fn denormalize(&self, rows: &[f32]) -> Vec<f32> {
        rows.iter()
            .enumerate()
            .map(|(i, v)| v * self.std[i % FEATURES] + self.mean[i % FEATURES])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scoreguide_oracles::motion::{joint_heights, GroundOracle};

    fn set() -> MotionSet {
        MotionSet::generate(
            &MotionConfig {
                frames: 60,
                min_frames: 40,
            },
            60,
            3,
        )
        .unwrap()
    }

    #[test]
    fn every_action_touches_the_ground_and_never_goes_under() {
        let set = set();
        let oracle = GroundOracle { tolerance: 1e-5 };
        for a in 0..Action::ALL.len() as u32 {
            assert!(set.actions.contains(&a), "action {a} missing");
        }
        for i in 0..set.len() {
            let m = set.motion(i);
            assert!(!oracle.check(m, set.lengths[i]).unwrap().infracting());
            // Supported frames have their lowest joint on the ground.
            let lowest: Vec<f32> = (0..set.lengths[i])
                .map(|t| {
                    joint_heights(&m[t * FEATURES..(t + 1) * FEATURES])
                        .into_iter()
                        .fold(f32::INFINITY, f32::min)
                })
                .collect();
            let grounded = lowest.iter().filter(|&&y| y.abs() < 1e-5).count();
            assert!(grounded * 2 > lowest.len(), "motion {i}: {lowest:?}");
            assert!(m[set.lengths[i] * FEATURES..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn planted_feet_stay_put_and_walkers_travel() {
        use scoreguide_oracles::motion::joint_positions;
        let set = set();
        let mut planted = 0;
        for i in 0..set.len() {
            let (m, len) = (set.motion(i), set.lengths[i]);
            let p = joint_positions(m, len).unwrap();
            for t in 0..len - 1 {
                // The lowest foot joint of a frame on the ground, and the next frame's.
                let foot = |t: usize| {
                    *FOOT_JOINTS
                        .iter()
                        .min_by(|&&a, &&b| p[t * JOINTS + a][1].total_cmp(&p[t * JOINTS + b][1]))
                        .unwrap()
                };
                let (c, a, b) = (
                    foot(t),
                    p[t * JOINTS + foot(t)],
                    p[(t + 1) * JOINTS + foot(t)],
                );
                let lowest = |t: usize| {
                    (0..JOINTS)
                        .map(|j| p[t * JOINTS + j][1])
                        .fold(f32::INFINITY, f32::min)
                };
                if lowest(t).abs() < 1e-5 && lowest(t + 1).abs() < 1e-5 && a[1].abs() < 1e-5 {
                    planted += 1;
                    let slide = (b[0] - a[0]).hypot(b[2] - a[2]);
                    assert!(
                        slide < 2e-3,
                        "motion {i} frame {t}: joint {c} slides {slide} m"
                    );
                }
            }
            if Action::ALL[set.actions[i] as usize] == Action::Walk {
                let (a, b) = (p[0], p[(len - 1) * JOINTS]);
                let speed = (b[0] - a[0]).hypot(b[2] - a[2]) / (len as f32 / 20.0);
                assert!((0.5..2.0).contains(&speed), "walking at {speed} m/s");
            }
        }
        assert!(planted > 1000, "{planted}");
    }

    #[test]
    fn seeds_fix_motions_and_statistics_standardise() {
        let cfg = MotionConfig {
            frames: 30,
            min_frames: 20,
        };
        let a = MotionSet::generate(&cfg, 5, 1).unwrap();
        let b = MotionSet::generate(&cfg, 8, 1).unwrap();
        assert_eq!(a.motion(4), b.motion(4));
        assert_ne!(
            a.motion(0),
            MotionSet::generate(&cfg, 1, 2).unwrap().motion(0)
        );
        let norm = Normalizer::fit(&b, 1e-3).unwrap();
        let idx: Vec<u32> = (0..8).collect();
        let rows = norm.rows(&b, &idx, &Device::Cpu).unwrap();
        let v: Vec<f32> = rows.flatten_all().unwrap().to_vec1().unwrap();
        let back = norm.denormalize(&v);
        for i in 0..8 {
            let len = b.lengths[i] * FEATURES;
            for k in 0..len {
                let (x, y) = (back[i * b.row_dim() + k], b.motion(i)[k]);
                assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()));
            }
        }
        let masks = b.masks(&[0, 3], &Device::Cpu).unwrap();
        let m: Vec<f32> = masks.sum(1).unwrap().to_vec1().unwrap();
        assert_eq!(m, vec![b.lengths[0] as f32, b.lengths[3] as f32]);
    }

    #[test]
    fn humanml3d_files_are_read_in_our_columns() {
        let dir = std::env::temp_dir().join(format!("sg-humanml3d-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("new_joint_vecs")).unwrap();
        let npy = |shape: &str, data: &[f32]| {
            scoreguide_testing::npy_bytes("<f4", false, shape, &scoreguide_testing::f32_bytes(data))
        };
        let long: Vec<f32> = (0..50 * 263).map(|i| (i % 263) as f32).collect();
        std::fs::write(dir.join("new_joint_vecs/a.npy"), npy("(50, 263)", &long)).unwrap();
        std::fs::write(
            dir.join("new_joint_vecs/b.npy"),
            npy("(5, 263)", &long[..5 * 263]),
        )
        .unwrap();
        std::fs::write(dir.join("test.txt"), "a\nb\n").unwrap();
        let stats: Vec<f32> = (0..263).map(|i| 1.0 + i as f32).collect();
        std::fs::write(dir.join("Mean.npy"), npy("(263,)", &stats)).unwrap();
        std::fs::write(dir.join("Std.npy"), npy("(263,)", &stats)).unwrap();
        let cfg = MotionConfig {
            frames: 40,
            min_frames: 10,
        };
        let set = MotionSet::humanml3d(&dir, "test", &cfg).unwrap();
        assert_eq!((set.len(), set.lengths[0]), (1, 40));
        assert_eq!(set.motion(0)[66], 66.0);
        assert_eq!(set.motion(0)[67], 259.0);
        let norm = Normalizer::humanml3d(&dir).unwrap();
        assert_eq!(norm.mean[70], 263.0);
        let e = MotionSet::humanml3d(&dir, "train", &cfg).unwrap_err();
        assert!(e.to_string().contains("train.txt"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
