//! Runs survive `kill -9`. A Gen-neG motion run (baseline training, encoder, draws,
//! classifiers, distillation, evaluation) is killed at random moments, 20 times, and
//! continued with reuse each time. After every kill each kept file must load; at the
//! end the rows and every model's tensors must equal an uninterrupted run's, bit for bit.
//!
//! The run being killed is this test binary itself, re-executed on the ignored test
//! `kill::motion_run_child` with the folder in `SG_KILL_DIR`. The `scoreguide train`
//! command's checkerboard training is killed 10 times the same way.

use candle_core::Device;
use rand::{Rng, SeedableRng};
use scoreguide::experiments::config::resolve;
use scoreguide::motion::stages::Run;
use scoreguide::motion::{ModelRow, MotionRunConfig};
use scoreguide::train::Checkpoint;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn tiny() -> MotionRunConfig {
    let sets = [
        "data.frames=12",
        "data.min_frames=8",
        "data.train=80",
        "data.test=24",
        "model.net.frames=12",
        "model.net.hidden=32",
        "model.net.blocks=1",
        "model.diffusion_steps=50",
        "model.iters=80",
        "model.save_every=10",
        "sampler.steps=6",
        "genneg.per_class=10",
        "genneg.budget=60",
        "genneg.classifier_iters=20",
        "genneg.distill_iters=40",
        "encoder.iters=30",
        "eval.samples=24",
        "eval.seeds=2",
        "eval.r_elbo_draws=1",
        "eval.sampler_comparison.samples=8",
        "eval.sampler_comparison.ddpm_steps=20",
    ]
    .map(String::from);
    resolve(true, None, &sets).unwrap()
}

/// The whole run in `out`, continuing whatever is kept there.
fn run_in(out: &Path) -> Vec<ModelRow> {
    let run = Run {
        cfg: tiny(),
        out: out.to_path_buf(),
        dev: Device::Cpu,
        seed: 5,
        reuse: true,
    };
    run.run_all().unwrap().rows
}

#[test]
#[ignore]
fn motion_run_child() {
    if let Some(dir) = std::env::var_os("SG_KILL_DIR") {
        run_in(Path::new(&dir));
    }
}

fn kept_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in [dir.to_path_buf(), dir.join("eval")] {
        if let Ok(entries) = std::fs::read_dir(&sub) {
            for e in entries.flatten() {
                let p = e.path();
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                if name.ends_with(".safetensors") && !name.starts_with('.') {
                    files.push(p);
                }
            }
        }
    }
    files.sort();
    files
}

#[test]
fn a_motion_run_killed_twenty_times_ends_as_an_uninterrupted_one() {
    let root = std::env::temp_dir().join(format!("sg-kill-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    let whole = root.join("whole");
    let t0 = Instant::now();
    let reference = run_in(&whole);
    let run_time = t0.elapsed();

    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (mut kills, mut starts, mut rounds) = (0, 0, 0);
    let mut stages_seen = std::collections::BTreeSet::new();
    // Rounds of a run from an empty folder, killed at random until it finishes, until
    // 20 kills have landed; each round must end as the uninterrupted run.
    while kills < 20 {
        rounds += 1;
        let killed = root.join(format!("killed{rounds}"));
        loop {
            starts += 1;
            assert!(starts < 400, "the run never finished");
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "kill::motion_run_child", "--ignored", "--quiet"])
                .env("SG_KILL_DIR", &killed)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let ms = rng.random_range(20..(run_time.as_millis() as u64 / 3).max(100));
            std::thread::sleep(Duration::from_millis(ms));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                // Whatever was kept loads: the last good state of every stage.
                for f in kept_files(&killed) {
                    Checkpoint::load(&f)
                        .unwrap_or_else(|e| panic!("after kill {kills}: {}: {e}", f.display()));
                    stages_seen.insert(f.file_name().unwrap().to_string_lossy().to_string());
                }
                continue;
            }
            let status = child.wait().unwrap();
            assert!(status.success(), "the continued run failed: {status}");
            break;
        }
        assert_eq!(run_in(&killed), reference, "round {rounds}");
        same_tensors(&whole, &killed);
    }
    eprintln!(
        "killed {kills} times over {starts} starts in {rounds} rounds; kept files seen between kills: {}",
        stages_seen.len()
    );
    std::fs::remove_dir_all(&root).ok();
}

/// Every model and set kept in `whole` equals `killed`'s, to the bit.
fn same_tensors(whole: &Path, killed: &Path) {
    let bits = |t: &candle_core::Tensor| -> Vec<u64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let files = kept_files(whole);
    assert_eq!(files.len(), kept_files(killed).len());
    for f in files {
        let rel = f.strip_prefix(whole).unwrap();
        let (a, b) = (
            Checkpoint::load(&f).unwrap(),
            Checkpoint::load(killed.join(rel)).unwrap(),
        );
        assert_eq!(a.tensors.len(), b.tensors.len(), "{}", rel.display());
        for (k, t) in &a.tensors {
            let u = &b.tensors[k];
            assert!(
                t.dims() == u.dims() && bits(t) == bits(u),
                "{}: tensor {k} differs",
                rel.display()
            );
        }
    }
}

/// The `scoreguide train --resume` command on the checkerboard, killed at random moments
/// and rerun until it finishes: the final baseline equals an uninterrupted one, to the bit.
#[test]
fn checkerboard_training_killed_ten_times_ends_as_an_uninterrupted_one() {
    let root = std::env::temp_dir().join(format!("sg-kill-cb-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    let config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/checkerboard/quick.toml");
    let train = |out: &Path| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_scoreguide"));
        c.args(["train", "--config"])
            .arg(&config)
            .args([
                "--set",
                "baseline.iters=100",
                "--set",
                "save_every=10",
                "--resume",
                "--threads",
                "1",
                "--out",
            ])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let whole = root.join("whole");
    let t0 = Instant::now();
    assert!(train(&whole).status().unwrap().success());
    let run_time = t0.elapsed();
    let killed = root.join("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let (mut kills, mut starts) = (0, 0);
    loop {
        starts += 1;
        assert!(starts < 200, "the training never finished");
        let mut child = train(&killed).spawn().unwrap();
        if kills < 10 {
            let ms = rng.random_range(20..(run_time.as_millis() as u64 / 3).max(100));
            std::thread::sleep(Duration::from_millis(ms));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                for f in kept_files(&killed) {
                    Checkpoint::load(&f)
                        .unwrap_or_else(|e| panic!("after kill {kills}: {}: {e}", f.display()));
                }
                continue;
            }
        }
        assert!(child.wait().unwrap().success());
        if kills >= 10 {
            break;
        }
        // Finished before ten kills landed: start over in an empty folder.
        same_tensors(&whole, &killed);
        std::fs::remove_dir_all(&killed).ok();
    }
    eprintln!("checkerboard training: killed {kills} times over {starts} starts");
    same_tensors(&whole, &killed);
    std::fs::remove_dir_all(&root).ok();
}
