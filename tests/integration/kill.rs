//! Runs survive `kill -9`. A Gen-neG motion run (baseline training, encoder, draws,
//! classifiers, distillation, evaluation) is killed at random moments, 20 times, and
//! continued with reuse each time. After every kill each kept file must load; at the
//! end the rows and every model's tensors must equal an uninterrupted run's, bit for bit.
//!
//! The run being killed is this test binary itself, re-executed on the ignored test
//! `kill::motion_run_child` with the folder in `SG_KILL_DIR`. The `scoreguide` commands
//! of every other experiment (checkerboard and traffic training and Gen-neG, two-moons
//! and image training) are killed 10 times each the same way.

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
    record_kills(&format!(
        "motion run: killed {kills} times over {starts} starts in {rounds} rounds; kept files seen between kills: {}",
        stages_seen.len()
    ));
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

/// `scoreguide` commands run one after another in one folder (each continuing what the
/// ones before it kept there), killed at one random moment of the sequence, and started
/// over from the first command (which reuses what was kept) until `kills` kills have
/// landed and the sequence has finished. After every kill each kept file must load; at
/// the end every file must equal an uninterrupted sequence's, to the bit. A sequence that
/// finishes before enough kills landed is checked the same way and begun again in an
/// empty folder. `{out}` in an argument stands for the folder.
fn commands_killed(name: &str, commands: &[Vec<String>], kills_wanted: usize, seed: u64) {
    let root = std::env::temp_dir().join(format!("sg-kill-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    let command = |args: &[String], out: &Path| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_scoreguide"));
        let dir = out.display().to_string();
        c.args(args.iter().map(|a| a.replace("{out}", &dir)))
            .args(["--threads", "1", "--out"])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };
    let finish = |args: &[String], out: &Path| {
        let o = command(args, out).output().unwrap();
        assert!(
            o.status.success(),
            "{name}: scoreguide {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let whole = root.join("whole");
    let t0 = Instant::now();
    for args in commands {
        finish(args, &whole);
    }
    let run_ms = t0.elapsed().as_millis() as u64;

    let killed = root.join("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut kills, mut starts, mut files_seen) = (0, 0, std::collections::BTreeSet::new());
    'sequence: loop {
        starts += 1;
        assert!(starts < 300, "{name}: the commands never finished");
        let kill_at = (kills < kills_wanted)
            .then(|| Duration::from_millis(rng.random_range(20..(run_ms / 3).max(100))));
        let t = Instant::now();
        for args in commands {
            let Some(at) = kill_at else {
                finish(args, &killed);
                continue;
            };
            let mut child = command(args, &killed)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "{name}: scoreguide {}: {status}",
                        args.join(" ")
                    );
                    break;
                }
                if t.elapsed() >= at {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    kills += 1;
                    // Whatever was kept loads: the last good state of every stage.
                    for f in kept_files(&killed) {
                        Checkpoint::load(&f).unwrap_or_else(|e| {
                            panic!("{name}, after kill {kills}: {}: {e}", f.display())
                        });
                        files_seen.insert(f.file_name().unwrap().to_string_lossy().to_string());
                    }
                    continue 'sequence;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        same_tensors(&whole, &killed);
        if kills >= kills_wanted {
            break;
        }
        // Finished before enough kills landed: begin again in an empty folder.
        std::fs::remove_dir_all(&killed).ok();
    }
    record_kills(&format!(
        "{name}: killed {kills} times over {starts} starts (uninterrupted: {run_ms} ms); kept files seen between kills: {files_seen:?}"
    ));
    std::fs::remove_dir_all(&root).ok();
}

fn args(words: &str) -> Vec<String> {
    words.split_whitespace().map(String::from).collect()
}

fn config(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(path)
        .display()
        .to_string()
}

/// The checkerboard's `scoreguide train --resume`, then two Gen-neG iterations
/// (`scoreguide genneg --resume`) on the baseline it kept.
#[test]
fn checkerboard_training_and_genneg_killed_ten_times_end_as_uninterrupted_ones() {
    let train = args(&format!(
        "train --config {} --set baseline.iters=100 --set save_every=10 --resume",
        config("checkerboard/quick.toml")
    ));
    let genneg = args(&format!(
        "genneg --config {} --set iterations=2 --set per_class=200 --set budget=4000 \
         --set classifier.iters=60 --set steps=16 --set first_budget=4000 --resume --baseline {{out}}/baseline.safetensors",
        config("genneg_checkerboard/quick.toml")
    ));
    commands_killed("checkerboard", &[train, genneg], 10, 4);
}

/// The traffic run's `scoreguide train --resume` (scenes and baseline), then its
/// `scoreguide genneg` (an iteration's draws and classifier, the distillation, the
/// evaluation), on a baseline trained just enough that the draws hold valid vehicles.
#[test]
fn traffic_training_and_genneg_killed_ten_times_end_as_uninterrupted_ones() {
    let tiny = "--set data.train_scenes=256 --set baseline.iters=500 --set baseline.batch=64 \
        --set save_every=20 --set sampler.steps=16 --set genneg.iterations=2 \
        --set genneg.draws=32 --set genneg.classifier_iters=20 --set genneg.check_draws=8 \
        --set genneg.ablations=false --set distill.iters=40 --set eval.samples=8 --seed 3";
    let config = config("genneg_traffic/quick.toml");
    let train = args(&format!("train --config {config} {tiny} --resume"));
    let genneg = args(&format!("genneg --config {config} {tiny}"));
    commands_killed("traffic", &[train, genneg], 10, 6);
}

/// The two-moons `scoreguide train --resume`: the score model, then the three
/// classifiers trained on it.
#[test]
fn two_moons_training_killed_ten_times_ends_as_an_uninterrupted_one() {
    let train = args(&format!(
        "train --config {} --set moons.points=1000 --set moons.batch=256 \
         --set moons.score_iters=600 --set moons.classifier_iters=200 --set save_every=20 \
         --resume",
        config("dlsm_moons/quick.toml")
    ));
    commands_killed("two moons", &[train], 10, 7);
}

/// DLSM on images, `scoreguide train --resume`: the U-Net, the cross-entropy and DLSM
/// classifiers on it, and the real-data classifier, on Fashion-MNIST (skipped where it
/// is not installed, unless `SCOREGUIDE_REQUIRE_DATA=1`, as in CI).
#[test]
fn image_training_killed_ten_times_ends_as_an_uninterrupted_one() {
    if !crate::fashion_mnist_installed() {
        return;
    }
    let train = args(&format!(
        "train --config {} --set score.train_images=200 --set score.iters=40 \
         --set score.batch=8 --set score.save_every=5 --set score.warmup_steps=5 \
         --set score.unet.base_channels=8 --set score.unet.groups=4 \
         --set score.unet.attention_resolutions=[] --set classifier.iters=12 \
         --set classifier.batch=8 --set classifier.save_every=3 \
         --set classifier.resnet.width=4 --set classifier.resnet.groups=4 --set cas.iters=10 \
         --set cas.train_images=200 --set cas.resnet.width=4 --set cas.resnet.groups=4 \
         --resume",
        config("dlsm_images/quick.toml")
    ));
    commands_killed("images", &[train], 10, 8);
}

/// Prints a kill count and appends it to `kill-counts.txt` in the tests' scratch folder,
/// where `.ci/run` shows it (libtest hides a passing test's output).
fn record_kills(line: &str) {
    use std::io::Write;
    eprintln!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kill-counts.txt");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}
