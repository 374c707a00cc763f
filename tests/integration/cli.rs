//! The `scoreguide` binary: `metrics` on the reference feature sets, both input formats,
//! and clear errors for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/metrics")
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_scoreguide"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("scoreguide-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn metrics_command_matches_the_reference_values() {
    let dir = reference_dir();
    let (real, fake) = (dir.join("dev_real.npy"), dir.join("dev_fake.npy"));
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let (ok, stdout, stderr) = run(&[
        "metrics",
        "--real",
        real.to_str().unwrap(),
        "--fake",
        fake.to_str().unwrap(),
        "--k",
        "5",
        "--mmd-sigma",
        "8",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let close = |a: &serde_json::Value, b: &serde_json::Value| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        (a - b).abs() <= 1e-9 * b.abs().max(1e-12)
    };
    assert!(close(&got["fid"], &expected["fid"]), "{got}");
    assert!(close(&got["kid"], &expected["kid"]), "{got}");
    assert!(close(&got["mmd2"], &expected["mmd2_rbf_sigma8"]), "{got}");
    for key in ["precision", "recall", "density", "coverage"] {
        assert!(close(&got[key], &expected["prdc_k5"][key]), "{key}: {got}");
    }

    // The same fake set as a safetensors file with one f32 tensor gives the same answer.
    let arr = scoreguide::metrics::read_npy(&std::fs::read(&fake).unwrap()).unwrap();
    let t = candle_core::Tensor::from_vec(
        arr.data.iter().map(|v| *v as f32).collect::<Vec<f32>>(),
        (arr.rows, arr.cols),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let st = tmp("fake.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("x".to_string(), t)]),
        &st,
    )
    .unwrap();
    let (ok, stdout2, stderr) = run(&[
        "metrics",
        "--real",
        real.to_str().unwrap(),
        "--fake",
        st.to_str().unwrap(),
        "--k",
        "5",
        "--mmd-sigma",
        "8",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let got2: serde_json::Value = serde_json::from_str(&stdout2).unwrap();
    assert_eq!(got["fid"], got2["fid"]);

    // The table names every metric.
    let (ok, table, _) = run(&[
        "metrics",
        "--real",
        real.to_str().unwrap(),
        "--fake",
        fake.to_str().unwrap(),
    ]);
    assert!(ok);
    for key in [
        "fid",
        "kid",
        "precision",
        "recall",
        "density",
        "coverage",
        "mmd2",
    ] {
        assert!(table.contains(key), "{table}");
    }
}

#[test]
fn metrics_command_rejects_bad_input() {
    let dir = reference_dir();
    let real = dir.join("dev_real.npy");
    let write = |name: &str, rows: usize, cols: usize, poison: bool| -> PathBuf {
        let mut v: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32).collect();
        if poison {
            v[cols + 1] = f32::NAN;
        }
        let t = candle_core::Tensor::from_vec(v, (rows, cols), &candle_core::Device::Cpu).unwrap();
        let p = tmp(name);
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("x".to_string(), t)]),
            &p,
        )
        .unwrap();
        p
    };
    let cases = [
        (
            write("narrow.safetensors", 50, 8, false),
            "rows of 32 values",
        ),
        (write("nan.safetensors", 50, 32, true), "row 1 holds a NaN"),
        (write("few.safetensors", 3, 32, false), "at least 4"),
    ];
    for (fake, needle) in &cases {
        let (ok, _, stderr) = run(&[
            "metrics",
            "--real",
            real.to_str().unwrap(),
            "--fake",
            fake.to_str().unwrap(),
        ]);
        assert!(!ok);
        assert!(stderr.contains(needle), "{needle}: {stderr}");
        assert!(
            stderr.contains(fake.file_name().unwrap().to_str().unwrap())
                || needle.starts_with("rows"),
            "{stderr}"
        );
    }
    let (ok, _, stderr) = run(&[
        "metrics",
        "--real",
        real.to_str().unwrap(),
        "--fake",
        "Cargo.toml",
    ]);
    assert!(!ok && stderr.contains("Cargo.toml"), "{stderr}");
}

/// `metrics --features CLASSIFIER` compares images on a noise-free ResNet's features:
/// the same images give FID 0, shifted images a positive FID, and the output names the
/// feature network; a classifier that is not a noise-free ResNet is refused by name.
#[test]
fn metrics_on_classifier_features() {
    use candle_core::{DType, Device, Tensor};
    use scoreguide::nets::{NetConfig, ParamStore, ResNetConfig};
    use scoreguide::train::Checkpoint;
    let dev = Device::Cpu;
    let save_classifier = |cfg: ResNetConfig, name: &str| {
        let store = ParamStore::new(3);
        let net = NetConfig::ResNet(cfg);
        net.build(&store.var_builder(DType::F32, &dev)).unwrap();
        let mut c = Checkpoint::new();
        c.insert_section("ema", &store.tensors().unwrap());
        c.set_meta("model", &net).unwrap();
        let path = tmp(name);
        c.save(&path).unwrap();
        path
    };
    let small = ResNetConfig {
        blocks: vec![1, 1],
        ..ResNetConfig::resnet18(1, 8, 3, 8).noise_free()
    };
    let classifier = save_classifier(small.clone(), "classifier.safetensors");
    let images = |shift: f32, name: &str| {
        let v: Vec<f32> = (0..40 * 64)
            .map(|i| (((i * 37) % 101) as f32 / 50.0 - 1.0) * 0.8 + shift)
            .collect();
        let mut t = std::collections::HashMap::new();
        t.insert(
            "x".to_string(),
            Tensor::from_vec(v, (40, 64), &dev).unwrap(),
        );
        let path = tmp(name);
        candle_core::safetensors::save(&t, &path).unwrap();
        path
    };
    let (a, b) = (images(0.0, "a.safetensors"), images(0.3, "b.safetensors"));
    let fid_of = |x: &PathBuf, y: &PathBuf| -> f64 {
        let (ok, stdout, stderr) = run(&[
            "metrics",
            "--real",
            x.to_str().unwrap(),
            "--fake",
            y.to_str().unwrap(),
            "--features",
            classifier.to_str().unwrap(),
            "--json",
        ]);
        assert!(ok, "{stderr}");
        let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(got["dim"], 16, "the last stage's 2w = 16 channels");
        assert!(got["features"]
            .as_str()
            .unwrap()
            .contains("classifier.safetensors"));
        got["fid"].as_f64().unwrap()
    };
    assert!(fid_of(&a, &a).abs() < 1e-6);
    assert!(fid_of(&a, &b) > 1e-4);
    let noisy = save_classifier(ResNetConfig::resnet18(1, 8, 3, 8), "noisy.safetensors");
    let (ok, _, stderr) = run(&[
        "metrics",
        "--real",
        a.to_str().unwrap(),
        "--fake",
        b.to_str().unwrap(),
        "--features",
        noisy.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("noisy.safetensors") && stderr.contains("noise-free"),
        "{stderr}"
    );
}

/// `train` → `sample` → `eval` on a small checkerboard configuration give what the
/// library gives on the same seeds; `genneg` writes a stack `sample` reads; bad input
/// exits 1 naming it, bad usage exits 2.
#[test]
fn train_genneg_sample_eval_compose() {
    let dir = tmp("cli-run");
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let d = dir.to_str().unwrap();
    let cb = configs.join("checkerboard/quick.toml");
    let (ok, _, err) = run(&[
        "train",
        "--config",
        cb.to_str().unwrap(),
        "--set",
        "baseline.iters=300",
        "--out",
        d,
        "--threads",
        "1",
    ]);
    assert!(ok, "{err}");
    let base = dir.join("baseline.safetensors");
    let samples = dir.join("samples.safetensors");
    let (ok, _, err) = run(&[
        "sample",
        "--model",
        base.to_str().unwrap(),
        "--n",
        "300",
        "--steps",
        "8",
        "--seed",
        "4",
        "--out",
        samples.to_str().unwrap(),
        "--threads",
        "1",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["eval", "--samples", samples.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The library on the same checkpoint and seed.
    let b = scoreguide::checkerboard::load_baseline(&base, &candle_core::Device::Cpu).unwrap();
    let x = scoreguide::checkerboard::sample(
        &b.model,
        300,
        8,
        4,
        10_000,
        &candle_core::Device::Cpu,
        "s",
    )
    .unwrap();
    let (rate, _) = scoreguide::checkerboard::label(&x).unwrap();
    assert_eq!(v["samples"], 300);
    assert_eq!(v["infraction_rate"].as_f64().unwrap(), rate.rate);

    let g = configs.join("genneg_checkerboard/quick.toml");
    let (ok, _, err) = run(&[
        "genneg",
        "--config",
        g.to_str().unwrap(),
        "--set",
        "iterations=1",
        "--set",
        "per_class=50",
        "--set",
        "budget=2000",
        "--set",
        "first_budget=2000",
        "--set",
        "min_negatives=10",
        "--set",
        "classifier.iters=20",
        "--set",
        "steps=8",
        "--baseline",
        base.to_str().unwrap(),
        "--out",
        d,
        "--threads",
        "1",
    ]);
    assert!(ok, "{err}");
    // --resume continues from a kept iteration only on the baseline it was built on.
    let mut other = scoreguide::train::Checkpoint::load(&base).unwrap();
    let (name, t) = other
        .tensors
        .iter()
        .find(|(k, _)| k.starts_with("ema."))
        .map(|(k, t)| (k.clone(), (t + 1.0).unwrap()))
        .unwrap();
    other.tensors.insert(name, t);
    let other_base = dir.join("other-baseline.safetensors");
    other.save(&other_base).unwrap();
    let (ok, _, err) = run(&[
        "genneg",
        "--config",
        g.to_str().unwrap(),
        "--set",
        "iterations=1",
        "--baseline",
        other_base.to_str().unwrap(),
        "--out",
        d,
        "--resume",
    ]);
    assert!(
        !ok && err.contains("genneg_1.safetensors")
            && err.contains("not built on this run's baseline"),
        "{err}"
    );
    let guided = dir.join("guided.safetensors");
    let stack = dir.join("genneg_1.safetensors");
    let (ok, _, err) = run(&[
        "sample",
        "--model",
        stack.to_str().unwrap(),
        "--n",
        "100",
        "--steps",
        "8",
        "--out",
        guided.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");

    at_scale(&dir, &base, &stack);

    // Bad input: status 1, the file named; bad usage: status 2.
    let status = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_scoreguide"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = status(&["eval", "--samples", base.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("baseline.safetensors"));
    assert_eq!(status(&["sample", "--n", "3"]).status.code(), Some(2));
    let e = status(&["train", "--config", g.to_str().unwrap()]);
    assert_eq!(e.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&e.stderr).contains("genneg_checkerboard"));
}

/// `sample --shard` and `draws --shard` (from the model, and by SIS from the baseline
/// or from the stack at half its guidance) in 4 shards merge to the single run's file
/// byte for byte; `sample --valid` returns only valid samples within its bound; a shard
/// of another run is refused.
fn at_scale(dir: &Path, base: &Path, stack: &Path) {
    let (base, stack) = (base.to_str().unwrap(), stack.to_str().unwrap());
    let file = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let sharded = |what: &[&str], name: &str| -> (Vec<u8>, Vec<u8>) {
        let single = file(&format!("{name}.safetensors"));
        let mut args = what.to_vec();
        args.extend(["--out", &single, "--threads", "1"]);
        let (ok, _, err) = run(&args);
        assert!(ok, "{err}");
        let mut parts = Vec::new();
        for i in [2, 0, 3, 1] {
            let part = file(&format!("{name}-{i}.safetensors"));
            let shard = format!("{i}/4");
            let mut args = what.to_vec();
            args.extend(["--shard", &shard, "--out", &part, "--threads", "1"]);
            let (ok, _, err) = run(&args);
            assert!(ok, "{err}");
            parts.push(part);
        }
        let merged = file(&format!("{name}-merged.safetensors"));
        let mut args = vec!["merge", "--out", &merged];
        args.extend(parts.iter().map(String::as_str));
        let (ok, _, err) = run(&args);
        assert!(ok, "{err}");
        // Three of four shards are not a run.
        let mut args = vec!["merge", "--out", &merged];
        args.extend(parts[1..].iter().map(String::as_str));
        assert!(!run(&args).0, "a merge of 3 of 4 shards succeeded");
        (
            std::fs::read(&single).unwrap(),
            std::fs::read(&merged).unwrap(),
        )
    };
    let (a, b) = sharded(
        &[
            "sample", "--model", stack, "--n", "250", "--steps", "12", "--batch", "40",
        ],
        "samples",
    );
    assert!(
        a == b,
        "sampling: 4 shards merged differ from the single run"
    );
    let (a, b) = sharded(
        &[
            "draws",
            "--model",
            stack,
            "--per-class",
            "15",
            "--budget",
            "400",
            "--batch",
            "50",
            "--min-negatives",
            "5",
            "--steps",
            "12",
        ],
        "draws",
    );
    assert!(a == b, "draws: 4 shards merged differ from the single run");
    // By SIS, from the baseline and from the stack at half its guidance: weighted
    // draws, the same sharded, and not the same as each other.
    let sis_draws = |proposal: [&str; 2], name: &str| {
        let mut args = vec!["draws", "--model", stack, "--sampler", "ancestral"];
        args.extend(proposal);
        args.extend([
            "--per-class",
            "15",
            "--budget",
            "400",
            "--batch",
            "50",
            "--min-negatives",
            "5",
            "--steps",
            "12",
        ]);
        let (a, b) = sharded(&args, name);
        assert!(
            a == b,
            "{name} draws: 4 shards merged differ from the single run"
        );
        let c =
            scoreguide::train::Checkpoint::load(dir.join(format!("{name}.safetensors"))).unwrap();
        let d = scoreguide::genneg::Draws::from_checkpoint(&c, &candle_core::Device::Cpu).unwrap();
        assert!(d.sis.is_some(), "{}", d.summary());
        a
    };
    let from_base = sis_draws(["--proposal", base], "sis");
    let tempered = sis_draws(["--proposal-guidance", "0.5"], "tempered");
    assert_ne!(from_base, tempered);
    // A baseline has no guidance to temper; the error names the file.
    let (ok, _, err) = run(&[
        "draws",
        "--model",
        base,
        "--proposal-guidance",
        "0.5",
        "--sampler",
        "ancestral",
        "--out",
        &file("refused.safetensors"),
    ]);
    assert!(
        !ok && err.contains("is a baseline, not a Gen-neG stack"),
        "{err}"
    );

    // A shard of another run (another seed) is refused by name.
    let other = file("other-shard.safetensors");
    let (ok, _, err) = run(&[
        "sample", "--model", stack, "--n", "250", "--steps", "12", "--batch", "40", "--seed", "9",
        "--shard", "0/4", "--out", &other,
    ]);
    assert!(ok, "{err}");
    let merged = file("bad-merge.safetensors");
    let mut args = vec!["merge", "--out", &merged, &other];
    let rest: Vec<String> = (1..4)
        .map(|i| file(&format!("samples-{i}.safetensors")))
        .collect();
    args.extend(rest.iter().map(String::as_str));
    let (ok, _, err) = run(&args);
    assert!(
        !ok && err.contains("other-shard.safetensors") && err.contains("another run"),
        "{err}"
    );

    let valid = file("valid.safetensors");
    let (ok, out, err) = run(&[
        "sample", "--model", stack, "--valid", "200", "--steps", "12", "--json", "--out", &valid,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["within_bound"], true, "{v}");
    assert!(v["drawn"].as_u64().unwrap() >= 200);
    let (ok, out, err) = run(&["eval", "--samples", &valid, "--json"]);
    assert!(ok, "{err}");
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["samples"], 200);
    assert_eq!(e["infraction_rate"].as_f64().unwrap(), 0.0);
    // Data-parallel training needs the NCCL build; this one says how to make it.
    let (ok, _, err) = run(&[
        "train",
        "--world-size",
        "2",
        "--rank",
        "0",
        "--set",
        "baseline.iters=5",
        "--out",
        dir.join("dp").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--features nccl"), "{err}");
    // --valid and --shard do not go together.
    assert!(
        !run(&["sample", "--model", stack, "--valid", "5", "--shard", "0/2", "--out", &valid]).0
    );
}

/// `scoreguide train` on image_score, then `sample` of the U-Net it wrote: N images in
/// [−1, 1] and their grid, the same seed giving the same images; `--valid` refused. On
/// Fashion-MNIST (skipped where it is not installed, unless SCOREGUIDE_REQUIRE_DATA=1).
#[test]
fn train_then_sample_an_image_model() {
    if !crate::fashion_mnist_installed() {
        return;
    }
    let dir = tmp("image");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/image_score/quick.toml");
    let d = dir.display().to_string();
    let (ok, _, err) = run(&[
        "train",
        "--config",
        &config.display().to_string(),
        "--set",
        "train_images=64",
        "--set",
        "iters=4",
        "--set",
        "batch=4",
        "--set",
        "unet.base_channels=8",
        "--set",
        "unet.groups=4",
        "--set",
        "unet.attention_resolutions=[]",
        "--threads",
        "1",
        "--out",
        &d,
    ]);
    assert!(ok, "{err}");
    let model = dir.join("score.safetensors").display().to_string();
    let sample = |seed: &str, out: &str| {
        let out = dir.join(out);
        let (ok, _, err) = run(&[
            "sample",
            "--model",
            &model,
            "--n",
            "5",
            "--steps",
            "3",
            "--seed",
            seed,
            "--out",
            &out.display().to_string(),
            "--threads",
            "1",
        ]);
        assert!(ok, "{err}");
        let c = scoreguide::train::Checkpoint::load(&out).unwrap();
        assert!(out.with_extension("png").exists());
        c.tensors["images"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let a = sample("2", "a.safetensors");
    assert_eq!(a.len(), 5 * 784);
    assert!(a.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert_eq!(sample("2", "b.safetensors"), a);
    assert_ne!(sample("3", "c.safetensors"), a);
    let (ok, _, err) = run(&["sample", "--model", &model, "--valid", "3", "--out", &d]);
    assert!(!ok && err.contains("image model"), "{err}");
}
