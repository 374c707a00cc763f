//! The checked-in configurations (configs/<experiment>/<preset>.toml) are the presets:
//! each resolves to its preset exactly. `SCOREGUIDE_WRITE_CONFIGS=1 cargo test -p
//! scoreguide-experiments --test configs` rewrites them from the presets.

use scoreguide_experiments::checkerboard::genneg::GennegCheckerboardConfig;
use scoreguide_experiments::checkerboard::sis::SisCheckerboardConfig;
use scoreguide_experiments::checkerboard::CheckerboardConfig;
use scoreguide_experiments::config::{preset_toml, resolve, Preset};
use scoreguide_experiments::dlsm_images::DlsmImagesConfig;
use scoreguide_experiments::images::{ImageClassifierConfig, ImageScoreConfig};
use scoreguide_experiments::moons::DlsmMoonsConfig;
use scoreguide_experiments::motion::MotionRunConfig;
use scoreguide_experiments::traffic::run::TrafficRunConfig;
use std::fmt::Debug;
use std::path::PathBuf;

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

fn check<T: Preset + PartialEq + Debug>(experiment: &str) {
    for (name, quick) in [("quick", true), ("full", false)] {
        let path = configs_dir().join(experiment).join(format!("{name}.toml"));
        if std::env::var_os("SCOREGUIDE_WRITE_CONFIGS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, preset_toml::<T>(name).unwrap()).unwrap();
        }
        // Over the other preset, so every value must come from the file.
        let from_file: T = resolve(!quick, Some(&path), &[])
            .or_else(|_| resolve(quick, Some(&path), &[]))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let preset = if quick { T::quick() } else { T::full() };
        assert_eq!(
            from_file,
            preset,
            "{} is not the {name} preset",
            path.display()
        );
    }
}

#[test]
fn checked_in_configs_are_the_presets() {
    check::<CheckerboardConfig>("checkerboard");
    check::<DlsmMoonsConfig>("dlsm_moons");
    check::<GennegCheckerboardConfig>("genneg_checkerboard");
    check::<SisCheckerboardConfig>("genneg_sis");
    check::<TrafficRunConfig>("genneg_traffic");
    check::<ImageScoreConfig>("image_score");
    check::<ImageClassifierConfig>("cas");
    check::<DlsmImagesConfig>("dlsm_images");
    check::<MotionRunConfig>("genneg_motion");
}

/// The partial configurations CI runs (configs/*/ci.toml) resolve.
#[test]
fn ci_configs_resolve() {
    let ci = |e: &str| configs_dir().join(e).join("ci.toml");
    let moons: DlsmMoonsConfig = resolve(false, Some(&ci("dlsm_moons")), &[]).unwrap();
    assert_eq!((moons.moons.score_iters, moons.samples), (1000, 500));
    let images: DlsmImagesConfig = resolve(false, Some(&ci("dlsm_images")), &[]).unwrap();
    assert_eq!((images.classifier.iters, images.n_per_class), (40, 4));
    for (file, classes) in [("cifar10.toml", 10), ("cifar100.toml", 100)] {
        let c: DlsmImagesConfig = resolve(
            false,
            Some(&configs_dir().join("dlsm_images").join(file)),
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.score.unet.size, c.classifier.resnet.classes),
            (32, classes)
        );
    }
    let traffic: TrafficRunConfig = resolve(false, Some(&ci("genneg_traffic")), &[]).unwrap();
    assert_eq!(traffic.baseline.iters, 1000);
    assert!(traffic.baseline.map_probe);
    assert_eq!(traffic.distill.map(|d| d.draws), Some(20));
    // The documented runs' configurations.
    let run = |e: &str, f: &str| configs_dir().join(e).join(f);
    let g: GennegCheckerboardConfig = resolve(
        false,
        Some(&run("genneg_checkerboard", "paper-30k.toml")),
        &[],
    )
    .unwrap();
    assert_eq!((g.per_class, g.classifier.iters), (30_000, 5_000));
    let s: SisCheckerboardConfig =
        resolve(false, Some(&run("genneg_sis", "tempered.toml")), &[]).unwrap();
    assert_eq!(
        s,
        SisCheckerboardConfig {
            proposal_guidance: 0.5,
            ..SisCheckerboardConfig::full()
        }
    );
    let m: DlsmMoonsConfig = resolve(false, Some(&run("dlsm_moons", "table1.toml")), &[]).unwrap();
    assert_eq!((m.moons.classifier_iters, m.samples), (40_000, 2_000));
    let r: DlsmMoonsConfig =
        resolve(false, Some(&run("dlsm_moons", "table1-resmlp.toml")), &[]).unwrap();
    assert_eq!(
        (r.moons.score_net.clone(), r.samples),
        (
            scoreguide_nets::NetConfig::ResMlp(scoreguide_nets::ResMlpConfig::default()),
            2_000
        )
    );
    for f in ["lu-seeds.toml", "lu-s1.toml"] {
        let t: TrafficRunConfig = resolve(false, Some(&run("genneg_traffic", f)), &[]).unwrap();
        assert_eq!(t.baseline.iters, 16_000);
        assert_eq!(t.genneg.guidance_sigma_max, Some(0.2));
        assert_eq!(t.distill.is_some(), f == "lu-s1.toml");
    }
    // What CI's validation run sets on the command line.
    let sets = [
        "genneg.iterations=0",
        "distill=none",
        "eval.split=validation",
        r#"eval.models=["baseline"]"#,
    ]
    .map(String::from);
    let v: TrafficRunConfig = resolve(true, None, &sets).unwrap();
    assert_eq!(v.eval.models, Some(vec!["baseline".to_string()]));
    assert!(v.distill.is_none());
    // A row the table cannot have is refused before anything runs.
    let e = resolve::<TrafficRunConfig>(true, None, &[r#"eval.models=["genneg_3"]"#.into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("genneg_3"), "{e}");
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    let dir = std::env::temp_dir().join(format!("sg-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "samples = 10\n[baseline]\niter = 5\n").unwrap();
    let e = resolve::<CheckerboardConfig>(true, Some(&typo), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("baseline.iter") && e.contains("typo.toml"),
        "{e}"
    );
    let e = resolve::<CheckerboardConfig>(true, None, &["samples=0".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("samples"), "{e}");
    let e = resolve::<CheckerboardConfig>(true, None, &["samples".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("KEY=VALUE"), "{e}");
    let e = resolve::<CheckerboardConfig>(true, None, &["samples=\"many\"".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("configuration"), "{e}");
    // A partial JSON file over the quick preset.
    let json = dir.join("part.json");
    std::fs::write(&json, r#"{"preset": "quick", "steps": 7}"#).unwrap();
    let cfg: CheckerboardConfig = resolve(false, Some(&json), &[]).unwrap();
    assert_eq!(
        (cfg.steps, cfg.samples),
        (7, CheckerboardConfig::quick().samples)
    );
    // Another network (`arch`) replaces the preset's table whole; within one network
    // an unknown key is still named.
    let net = dir.join("net.toml");
    let res_mlp = "[moons.score_net]\narch = \"res_mlp\"\nin_dim = 2\nout_dim = 2\nhidden = 64\nblocks = 1\n[moons.score_net.embedding]\ndim = 32\nmax_freq = 1000.0\n";
    std::fs::write(&net, format!("preset = \"quick\"\n{res_mlp}")).unwrap();
    let m: DlsmMoonsConfig = resolve(false, Some(&net), &[]).unwrap();
    assert_eq!(m.moons.score_model().net.in_dim(), 2);
    assert!(
        matches!(m.moons.score_net, scoreguide_nets::NetConfig::ResMlp(c) if c.hidden == 64 && c.blocks == 1),
        "{:?}",
        m.moons.score_net
    );
    std::fs::write(
        &net,
        "preset = \"quick\"\n[moons.score_net]\narch = \"toy_mlp\"\nhidden = 3\n",
    )
    .unwrap();
    let e = resolve::<DlsmMoonsConfig>(false, Some(&net), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("moons.score_net.hidden"), "{e}");
    // A score network that does not map the plane to itself is refused by name.
    let three = res_mlp.replace("out_dim = 2", "out_dim = 3");
    std::fs::write(&net, format!("preset = \"quick\"\n{three}")).unwrap();
    let e = resolve::<DlsmMoonsConfig>(false, Some(&net), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("moons.score_net"), "{e}");
    // The sampler stops above 0 and below where it starts.
    for bad in ["sample_sigma_min=0", "sample_sigma_min=10"] {
        let e = resolve::<DlsmMoonsConfig>(true, None, &[bad.into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sample_sigma_min"), "{bad}: {e}");
    }
    let m: DlsmMoonsConfig = resolve(true, None, &["sample_sigma_min=0.1".into()]).unwrap();
    assert_eq!(m.sample_sigma_min, 0.1);
    std::fs::remove_dir_all(&dir).ok();
}
