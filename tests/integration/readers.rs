//! Every file reader against the inputs a user ends up with by mistake: each (input
//! class, reader) must end in an error that names the file — never a panic, an abort or
//! a hang — or be read as the value it holds where the class is a legal encoding.
//! `SCOREGUIDE_WRITE_BAD_INPUTS=1` rewrites docs/BAD_INPUTS.md, the table of messages.

use candle_core::{DType, Device, Tensor};
use scoreguide::data::motion::{MotionConfig, MotionSet};
use scoreguide::data::{read_idx, SceneSet};
use scoreguide::experiments::checkerboard::CheckerboardConfig;
use scoreguide::experiments::config::resolve;
use scoreguide::metrics::{read_feature_rows, read_npy};
use scoreguide::nets::{ParamStore, ScoreModelConfig};
use scoreguide::train::Checkpoint;
use scoreguide::train::{load_score_model, Weights};
use scoreguide_testing::{f32_bytes, npy_bytes as npy};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// How a reader ended on one input.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Read(String),
    Error(String),
    Panic(String),
    Hang,
}

/// Runs `f` on its own thread, with a time limit, catching panics.
fn outcome(f: impl FnOnce() -> candle_core::Result<String> + Send + 'static) -> Outcome {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let o = match r {
            Ok(Ok(s)) => Outcome::Read(s),
            Ok(Err(e)) => Outcome::Error(e.to_string().lines().next().unwrap_or("").to_string()),
            Err(p) => Outcome::Panic(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            ),
        };
        tx.send(o).ok();
    });
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or(Outcome::Hang)
}

/// A safetensors file of named tensors given as (dtype name, shape, bytes), with
/// metadata, written byte by byte (so any dtype and any shape can be claimed).
fn safetensors(tensors: &[(&str, &str, Vec<i64>, Vec<u8>)], meta: &[(&str, &str)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut body: Vec<u8> = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [body.len(), body.len() + bytes.len()]}),
        );
        body.extend(bytes);
    }
    if !meta.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(body);
    out
}

/// A small checkerboard score model's checkpoint (weights as `ema.*`, metadata `model`).
fn checkpoint_bytes() -> (Vec<u8>, Checkpoint) {
    let cfg = ScoreModelConfig::checkerboard();
    let store = ParamStore::new(0);
    cfg.build(&store.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    let mut c = Checkpoint::new();
    c.insert_section("ema", &store.tensors().unwrap());
    c.set_meta("model", &cfg).unwrap();
    (c.to_bytes().unwrap(), c)
}

/// The same checkpoint with `edit` applied.
fn edited(edit: impl FnOnce(&mut Checkpoint)) -> Vec<u8> {
    let (_, mut c) = checkpoint_bytes();
    edit(&mut c);
    c.to_bytes().unwrap()
}

fn with_net(key: &str, value: serde_json::Value) -> Vec<u8> {
    edited(|c| {
        let mut m: serde_json::Value = serde_json::from_str(&c.metadata["model"]).unwrap();
        m["net"][key] = value;
        c.metadata.insert("model".into(), m.to_string());
    })
}

type Reader = fn(&Path) -> candle_core::Result<String>;

/// (reader, input class, file name, bytes, whether reading it is right).
type Case = (
    &'static str,
    Reader,
    &'static str,
    &'static str,
    Vec<u8>,
    bool,
);

fn read_checkpoint(p: &Path) -> candle_core::Result<String> {
    let c = Checkpoint::load(p)?;
    let (_, cfg) = load_score_model(&c, Weights::Ema, DType::F32, &Device::Cpu)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", p.display())))?;
    Ok(format!("a {:?} model", cfg.net).chars().take(40).collect())
}

fn read_npy_file(p: &Path) -> candle_core::Result<String> {
    let bytes = std::fs::read(p)?;
    let a =
        read_npy(&bytes).map_err(|e| candle_core::Error::msg(format!("{}: {e}", p.display())))?;
    Ok(format!("{} × {}", a.rows, a.cols))
}

fn read_features(p: &Path) -> candle_core::Result<String> {
    let a = read_feature_rows(p)?;
    Ok(format!("{} × {}", a.rows, a.cols))
}

fn read_scenes(p: &Path) -> candle_core::Result<String> {
    Ok(format!("{} scenes", SceneSet::load(p)?.len()))
}

fn read_config(p: &Path) -> candle_core::Result<String> {
    resolve::<CheckerboardConfig>(true, Some(p), &[])?;
    Ok("a configuration".into())
}

fn read_idx_file(p: &Path) -> candle_core::Result<String> {
    let (dims, _) = read_idx(p, 3)?;
    Ok(format!("{dims:?}"))
}

fn read_cifar(p: &Path) -> candle_core::Result<String> {
    let dir = p.parent().unwrap();
    let set = scoreguide::data::cifar(dir, false, scoreguide::data::ImageSplit::Test)?;
    Ok(format!("{} images", set.len()))
}

fn read_motion(p: &Path) -> candle_core::Result<String> {
    let dir = p.parent().unwrap().parent().unwrap();
    let set = MotionSet::humanml3d(
        dir,
        "test",
        &MotionConfig {
            frames: 40,
            min_frames: 2,
        },
    )?;
    Ok(format!("{} motions", set.len()))
}

/// Every case, grouped by reader.
fn cases() -> Vec<Case> {
    let (ckpt, _) = checkpoint_bytes();
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
    let features = |dtype: &str, bytes: Vec<u8>, shape: Vec<i64>| {
        safetensors(&[("x", dtype, shape, bytes)], &[])
    };
    let f8 = vec![0x38u8; 8];
    let mut v: Vec<Case> = vec![
        (
            "checkpoint",
            read_checkpoint,
            "empty file",
            "c.safetensors",
            vec![],
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "garbage",
            "c.safetensors",
            garbage.clone(),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "truncated",
            "c.safetensors",
            ckpt[..ckpt.len() / 2].to_vec(),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "missing tensor",
            "c.safetensors",
            edited(|c| {
                let k = c.tensors.keys().next().unwrap().clone();
                c.tensors.remove(&k);
            }),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "wrong shape",
            "c.safetensors",
            edited(|c| {
                let k = c.tensors.keys().next().unwrap().clone();
                c.tensors
                    .insert(k, Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap());
            }),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "NaN weights",
            "c.safetensors",
            edited(|c| {
                let k = c.tensors.keys().next().unwrap().clone();
                let t = (c.tensors[&k].clone() * f64::NAN).unwrap();
                c.tensors.insert(k, t);
            }),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "bf16 weights",
            "c.safetensors",
            edited(|c| {
                let k = c.tensors.keys().next().unwrap().clone();
                let t = c.tensors[&k].to_dtype(DType::BF16).unwrap();
                c.tensors.insert(k, t);
            }),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "u8 weights",
            "c.safetensors",
            edited(|c| {
                let k = c.tensors.keys().next().unwrap().clone();
                let t = c.tensors[&k].to_dtype(DType::U8).unwrap();
                c.tensors.insert(k, t);
            }),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "unparsable metadata",
            "c.safetensors",
            edited(|c| {
                c.metadata.insert("model".into(), "{not json".into());
            }),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "absent metadata",
            "c.safetensors",
            edited(|c| {
                c.metadata.remove("model");
            }),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "hidden width 1,000,000",
            "c.safetensors",
            with_net("hidden", 1_000_000.into()),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "100,000,000 blocks",
            "c.safetensors",
            with_net("blocks", 100_000_000.into()),
            false,
        ),
        (
            "checkpoint",
            read_checkpoint,
            "valid",
            "c.safetensors",
            ckpt.clone(),
            true,
        ),
        (
            "features",
            read_features,
            "garbage",
            "f.safetensors",
            garbage.clone(),
            false,
        ),
        (
            "features",
            read_features,
            "f8",
            "f.safetensors",
            features("F8_E4M3", f8.clone(), vec![4, 2]),
            false,
        ),
        (
            "features",
            read_features,
            "i32",
            "f.safetensors",
            features("I32", vec![0; 32], vec![4, 2]),
            false,
        ),
        (
            "features",
            read_features,
            "bool",
            "f.safetensors",
            features("BOOL", vec![1; 8], vec![4, 2]),
            false,
        ),
        (
            "features",
            read_features,
            "f16",
            "f.safetensors",
            features("F16", vec![0; 16], vec![4, 2]),
            true,
        ),
        (
            "features",
            read_features,
            "bf16",
            "f.safetensors",
            features("BF16", vec![0; 16], vec![4, 2]),
            true,
        ),
        (
            "features",
            read_features,
            "overflowing shape",
            "f.safetensors",
            features("F32", vec![0; 32], vec![1 << 40, 1 << 40]),
            false,
        ),
        (
            "features",
            read_features,
            "negative shape",
            "f.safetensors",
            features("F32", vec![0; 32], vec![-4, 2]),
            false,
        ),
        (
            "features",
            read_features,
            "1-D",
            "f.safetensors",
            features("F32", vec![0; 32], vec![8]),
            false,
        ),
        (
            "features",
            read_features,
            "two tensors",
            "f.safetensors",
            safetensors(
                &[
                    ("a", "F32", vec![1, 1], vec![0; 4]),
                    ("b", "F32", vec![1, 1], vec![0; 4]),
                ],
                &[],
            ),
            false,
        ),
        (
            "features",
            read_features,
            "valid",
            "f.safetensors",
            features("F32", f32_bytes(&[1.0; 8]), vec![4, 2]),
            true,
        ),
        (
            "npy",
            read_npy_file,
            "garbage",
            "a.npy",
            garbage.clone(),
            false,
        ),
        (
            "npy",
            read_npy_file,
            "truncated",
            "a.npy",
            npy("<f4", false, "(4, 2)", &[0; 16]),
            false,
        ),
        (
            "npy",
            read_npy_file,
            "f16",
            "a.npy",
            npy("<f2", false, "(4, 2)", &[0; 16]),
            false,
        ),
        (
            "npy",
            read_npy_file,
            "i32",
            "a.npy",
            npy("<i4", false, "(4, 2)", &[0; 32]),
            false,
        ),
        (
            "npy",
            read_npy_file,
            "bool",
            "a.npy",
            npy("|b1", false, "(4, 2)", &[0; 8]),
            false,
        ),
        (
            "npy",
            read_npy_file,
            "complex",
            "a.npy",
            npy("<c8", false, "(4, 2)", &[0; 64]),
            false,
        ),
        (
            "npy",
            read_npy_file,
            "big-endian",
            "a.npy",
            npy(">f4", false, "(4, 2)", &[0; 32]),
            false,
        ),
        (
            "npy",
            read_npy_file,
            "Fortran order",
            "a.npy",
            npy("<f4", true, "(4, 2)", &[0; 32]),
            false,
        ),
        (
            "npy",
            read_npy_file,
            "negative shape",
            "a.npy",
            npy("<f4", false, "(-4, 2)", &[0; 32]),
            false,
        ),
        (
            "npy",
            read_npy_file,
            "overflowing shape",
            "a.npy",
            npy("<f4", false, "(1099511627776, 1099511627776)", &[0; 32]),
            false,
        ),
        (
            "npy",
            read_npy_file,
            "zero rows",
            "a.npy",
            npy("<f4", false, "(0, 2)", &[]),
            true,
        ),
        (
            "npy",
            read_npy_file,
            "valid",
            "a.npy",
            npy("<f4", false, "(4, 2)", &[0; 32]),
            true,
        ),
        (
            "scene set",
            read_scenes,
            "garbage",
            "s.safetensors",
            garbage.clone(),
            false,
        ),
        (
            "scene set",
            read_scenes,
            "a checkpoint instead",
            "s.safetensors",
            ckpt.clone(),
            false,
        ),
        (
            "config",
            read_config,
            "garbage",
            "c.toml",
            garbage.clone(),
            false,
        ),
        (
            "config",
            read_config,
            "unknown key",
            "c.toml",
            b"sampels = 10\n".to_vec(),
            false,
        ),
        (
            "config",
            read_config,
            "wrong type",
            "c.toml",
            b"samples = \"many\"\n".to_vec(),
            false,
        ),
        (
            "config",
            read_config,
            "invalid value",
            "c.toml",
            b"samples = 0\n".to_vec(),
            false,
        ),
        (
            "config",
            read_config,
            "truncated",
            "c.toml",
            b"[baseline\n".to_vec(),
            false,
        ),
        (
            "IDX",
            read_idx_file,
            "garbage",
            "i.idx",
            garbage.clone(),
            false,
        ),
        (
            "IDX",
            read_idx_file,
            "truncated",
            "i.idx",
            [
                vec![0, 0, 8, 3],
                10u32.to_be_bytes().to_vec(),
                28u32.to_be_bytes().to_vec(),
                28u32.to_be_bytes().to_vec(),
                vec![0; 100],
            ]
            .concat(),
            false,
        ),
        (
            "IDX",
            read_idx_file,
            "overflowing dims",
            "i.idx",
            [
                vec![0, 0, 8, 3],
                u32::MAX.to_be_bytes().to_vec(),
                u32::MAX.to_be_bytes().to_vec(),
                u32::MAX.to_be_bytes().to_vec(),
            ]
            .concat(),
            false,
        ),
        (
            "CIFAR",
            read_cifar,
            "wrong size",
            "test_batch.bin",
            vec![0; 3000],
            false,
        ),
        (
            "motion",
            read_motion,
            "wrong width",
            "new_joint_vecs/m.npy",
            npy("<f4", false, "(10, 200)", &[0; 8000]),
            false,
        ),
        (
            "motion",
            read_motion,
            "NaN rows",
            "new_joint_vecs/m.npy",
            npy("<f4", false, "(3, 263)", &f32_bytes(&[f32::NAN; 3 * 263])),
            false,
        ),
        (
            "motion",
            read_motion,
            "truncated",
            "new_joint_vecs/m.npy",
            npy("<f4", false, "(3, 263)", &[0; 100]),
            false,
        ),
        (
            "motion",
            read_motion,
            "valid",
            "new_joint_vecs/m.npy",
            npy("<f4", false, "(3, 263)", &f32_bytes(&[0.0; 3 * 263])),
            true,
        ),
    ];
    v.sort_by_key(|c| c.0);
    v
}

#[test]
fn every_reader_names_the_file_and_never_panics_or_hangs() {
    let root = std::env::temp_dir().join(format!("sg-readers-{}", std::process::id()));
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (i, (reader, read, class, name, bytes, legal)) in cases().into_iter().enumerate() {
        let dir = root.join(format!("case{i}"));
        let path: PathBuf = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        std::fs::write(dir.join("test.txt"), "m\n").unwrap();
        let p = path.clone();
        let o = outcome(move || read(&p));
        let shown = match &o {
            Outcome::Read(s) => format!("read: {s}"),
            Outcome::Error(e) => e.replace(&dir.display().to_string(), "DIR"),
            Outcome::Panic(p) => format!("PANIC: {p}"),
            Outcome::Hang => "HANG (30 s)".into(),
        };
        let ok = match &o {
            Outcome::Read(_) => legal,
            Outcome::Error(e) => !legal && e.contains(name.rsplit('/').next().unwrap()),
            _ => false,
        };
        if !ok {
            failures.push(format!("{reader} / {class}: {shown}"));
        }
        rows.push(format!(
            "| {reader} | {class} | {} |",
            shown.replace('|', "\\|")
        ));
    }
    std::fs::remove_dir_all(&root).ok();
    if std::env::var_os("SCOREGUIDE_WRITE_BAD_INPUTS").is_some() {
        let doc = format!(
            "# Bad inputs: what each reader says\n\nGenerated by `SCOREGUIDE_WRITE_BAD_INPUTS=1 cargo test --test integration readers` \
             (tests/integration/readers.rs), which fails if any case panics, hangs, is read when it should be refused, or is \
             refused without naming the file. DIR is the case's temporary folder. The fuzzing runs \
             of every reader are in docs/FUZZING.md.\n\n| reader | input | outcome |\n|---|---|---|\n{}\n",
            rows.join("\n")
        );
        std::fs::write(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/BAD_INPUTS.md"),
            doc,
        )
        .unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The fuzz targets' bodies (fuzz/fuzz_targets/*.rs), run here on their corpora.
fn fuzz_target(name: &str, data: &[u8]) {
    use scoreguide::data::motion::humanml3d_motion;
    match name {
        "checkpoint_reader" => {
            if let Ok(ck) = Checkpoint::from_bytes(data) {
                if ck.tensors.values().map(|t| t.elem_count()).sum::<usize>() < 1 << 20 {
                    let _ = load_score_model(&ck, Weights::Ema, DType::F32, &Device::Cpu);
                }
            }
        }
        "npy_reader" => {
            let _ = read_npy(data);
            let _ = scoreguide::metrics::read_npy_vector(data);
        }
        "feature_reader" => {
            let _ = scoreguide::metrics::parse_feature_rows(data);
        }
        "config_reader" => {
            if let Ok(text) = std::str::from_utf8(data) {
                for (name, quick) in [("c.toml", true), ("c.json", false)] {
                    let _ = scoreguide::experiments::config::resolve_text::<
                        scoreguide::motion::MotionRunConfig,
                    >(quick, Some((text, Path::new(name))), &[]);
                }
            }
        }
        "idx_reader" => {
            let _ = scoreguide::data::parse_idx(data, 3, "images");
            let _ = scoreguide::data::parse_idx(data, 1, "labels");
            let _ = scoreguide::data::parse_cifar(data, 1, "batch");
        }
        "scene_reader" => {
            let _ = SceneSet::from_bytes(data);
        }
        "motion_reader" => {
            let cfg = MotionConfig {
                frames: 60,
                min_frames: 2,
            };
            let _ = humanml3d_motion(data, "motion.npy", &cfg);
        }
        other => panic!("no fuzz target {other}"),
    }
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

const FUZZ_TARGETS: [&str; 7] = [
    "checkpoint_reader",
    "npy_reader",
    "feature_reader",
    "config_reader",
    "idx_reader",
    "scene_reader",
    "motion_reader",
];

/// Every file of every target's corpus (fuzz/corpus/<target>/: the seeds, and inputs the
/// fuzzer found that reach new code) goes through the target's body, so CI exercises
/// what the fuzzer did without nightly; a crash the fuzzer finds becomes a file here.
#[test]
fn fuzz_corpora_replay_without_a_panic() {
    let mut replayed = 0;
    for target in FUZZ_TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!files.is_empty(), "{} is empty", dir.display());
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let name = f.display().to_string();
            let o = outcome(move || {
                fuzz_target(target, &data);
                Ok(String::new())
            });
            assert!(matches!(o, Outcome::Read(_)), "{name}: {o:?}");
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} corpus files");
}

/// A fuzz target and its seed files (name, bytes).
type TargetSeeds = (&'static str, Vec<(&'static str, Vec<u8>)>);

/// Writes each target's seed inputs into its corpus (run by hand after a format change:
/// `cargo test --test integration -- --ignored write_fuzz_corpus_seeds`).
#[test]
#[ignore]
fn write_fuzz_corpus_seeds() {
    let small_ckpt = std::fs::read(fuzz_dir().join("seeds/tiny.safetensors")).unwrap();
    let scenes = {
        let cfg = scoreguide::data::SceneConfig {
            raster_cells: 16,
            vehicles: 2,
            ..Default::default()
        };
        let set = SceneSet::generate(&cfg, scoreguide::data::Split::Train, 1, 2, 0).unwrap();
        let p = std::env::temp_dir().join("sg-scene-seed.safetensors");
        set.save(&p).unwrap();
        std::fs::read(&p).unwrap()
    };
    let motion = npy(
        "<f4",
        false,
        "(3, 263)",
        &f32_bytes(&(0..3 * 263).map(|i| i as f32 * 1e-3).collect::<Vec<_>>()),
    );
    let idx = [
        vec![0, 0, 8, 3],
        2u32.to_be_bytes().to_vec(),
        2u32.to_be_bytes().to_vec(),
        2u32.to_be_bytes().to_vec(),
        vec![7; 8],
    ]
    .concat();
    let labels = [vec![0, 0, 8, 1], 3u32.to_be_bytes().to_vec(), vec![1, 2, 3]].concat();
    let cifar = [vec![3u8], vec![128; 3072]].concat();
    let quick = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/genneg_motion/quick.toml"),
    )
    .unwrap();
    let seeds: Vec<TargetSeeds> = vec![
        ("checkpoint_reader", vec![("tiny", small_ckpt)]),
        (
            "npy_reader",
            vec![
                ("f4", npy("<f4", false, "(2, 3)", &f32_bytes(&[1.0; 6]))),
                ("f8-vector", npy("<f8", false, "(3,)", &[0; 24])),
            ],
        ),
        (
            "feature_reader",
            vec![
                ("npy", npy("<f4", false, "(2, 3)", &f32_bytes(&[1.0; 6]))),
                (
                    "safetensors",
                    safetensors(&[("x", "F32", vec![2, 2], f32_bytes(&[1.0; 4]))], &[]),
                ),
            ],
        ),
        (
            "config_reader",
            vec![
                ("quick.toml", quick),
                (
                    "partial.json",
                    br#"{"model": {"iters": 10}, "eval": {"seeds": 1}}"#.to_vec(),
                ),
            ],
        ),
        (
            "idx_reader",
            vec![("images", idx), ("labels", labels), ("cifar", cifar)],
        ),
        ("scene_reader", vec![("two-scenes", scenes)]),
        ("motion_reader", vec![("three-frames", motion)]),
    ];
    for (target, files) in seeds {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
}
