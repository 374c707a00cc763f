//! Traffic scenes: the generator makes valid scenes, reproducibly, per split; scene sets
//! survive a save/load round trip; broken files are refused with the file named; the
//! oracle finds collisions and offroad vehicles that are put there.

use rand::rngs::StdRng;
use rand::SeedableRng;
use scoreguide::data::scenes::{generate_map, generate_scene, RoadKind};
use scoreguide::data::{SceneConfig, SceneSet, Split};
use scoreguide::oracles::scene::VEHICLE_FEATURES;
use scoreguide::oracles::{check_scene, Oracle, SceneOracle};
use scoreguide::train::Checkpoint;

fn small_set(split: Split, seed: u64) -> SceneSet {
    SceneSet::generate(&SceneConfig::default(), split, 12, 60, seed).unwrap()
}

#[test]
fn generated_scenes_are_valid_and_varied() {
    let set = small_set(Split::Train, 0);
    assert_eq!(set.len(), 60);
    assert_eq!(set.scene_dim(), 12 * VEHICLE_FEATURES);
    for i in 0..set.len() {
        let v = check_scene(set.map_of(i), set.scene(i));
        assert!(v.is_valid(), "scene {i}: {v:?}");
        let oracle = SceneOracle {
            map: set.map_of(i),
            agents: 12,
        };
        assert!(oracle.check(set.scene(i)).valid);
    }
    // All three layouts appear among 12 maps; roads cover a plausible share of the map.
    for kind in [RoadKind::Straight, RoadKind::Crossing, RoadKind::Curve] {
        assert!(
            set.kinds.contains(&kind),
            "no {kind:?} map in {:?}",
            set.kinds
        );
    }
    for m in &set.maps {
        let f = m.road_fraction();
        assert!((0.08..0.7).contains(&f), "road fraction {f}");
    }
    // Vehicle sizes and headings as generated: unit heading vectors, car-like sizes.
    for v in set.agents.chunks_exact(VEHICLE_FEATURES) {
        assert!(
            (3.8..7.5).contains(&v[2]) && (1.7..2.4).contains(&v[3]),
            "{v:?}"
        );
        assert!((v[4].hypot(v[5]) - 1.0).abs() < 1e-5);
    }
}

#[test]
fn generation_is_seeded_and_splits_differ() {
    let a = small_set(Split::Train, 3);
    assert_eq!(a, small_set(Split::Train, 3));
    assert_ne!(a.agents, small_set(Split::Train, 4).agents);
    let val = small_set(Split::Validation, 3);
    let test = small_set(Split::Test, 3);
    assert_ne!(a.maps, val.maps);
    assert_ne!(val.maps, test.maps);
}

#[test]
fn scene_sets_round_trip_and_bad_files_are_refused() {
    let set = small_set(Split::Test, 1);
    let dir = std::env::temp_dir().join(format!("scoreguide-traffic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scenes.safetensors");
    set.save(&path).unwrap();
    assert_eq!(SceneSet::load(&path).unwrap(), set);
    let maps = set.maps_tensor(32, &candle_core::Device::Cpu).unwrap();
    assert_eq!(maps.dims(), &[12, 1, 32, 32]);
    assert!(set.maps_tensor(30, &candle_core::Device::Cpu).is_err());

    // Truncated file: the error names it.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = SceneSet::load(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.safetensors"), "{e}");

    // A map index past the maps, and a checkpoint that is not a scene set.
    let mut c = Checkpoint::load(&path).unwrap();
    let n = set.len();
    c.tensors.insert(
        "map_index".into(),
        candle_core::Tensor::from_vec(vec![99u32; n], n, &candle_core::Device::Cpu).unwrap(),
    );
    let bad = dir.join("bad.safetensors");
    c.save(&bad).unwrap();
    let e = SceneSet::load(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors") && e.contains("map 99"), "{e}");
    let other = dir.join("other.safetensors");
    Checkpoint::new().save(&other).unwrap();
    let e = SceneSet::load(&other).unwrap_err().to_string();
    assert!(e.contains("other.safetensors") && e.contains("kind"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_oracle_finds_what_is_put_there() {
    let cfg = SceneConfig::default();
    let mut rng = StdRng::seed_from_u64(5);
    let map = generate_map(&cfg, &mut rng).unwrap();
    let mut scene = generate_scene(&cfg, &map, &mut rng).unwrap();
    assert!(check_scene(&map.raster, &scene).is_valid());
    // Vehicle 3 onto vehicle 7: both collide, nobody else.
    let f = VEHICLE_FEATURES;
    let (x7, y7) = (scene[7 * f], scene[7 * f + 1]);
    scene[3 * f] = x7 + 0.5;
    scene[3 * f + 1] = y7;
    let v = check_scene(&map.raster, &scene);
    assert_eq!(v.collision, (1 << 3) | (1 << 7));
    // Vehicle 0 off the map: offroad.
    scene[0] = 100.0;
    let v = check_scene(&map.raster, &scene);
    assert_eq!(v.offroad, 1);
}

#[test]
fn per_vehicle_training_sets_balance_and_weight() {
    use scoreguide::oracles::SceneVerdict;
    use scoreguide::traffic::{AgentLabelled, Drawn, Weighting};
    let dev = candle_core::Device::Cpu;
    // Three scenes of 12 vehicles: 2, 0 and 1 infracting vehicles (3 of 36).
    let verdicts = vec![
        SceneVerdict {
            collision: 0b11,
            offroad: 0,
        },
        SceneVerdict {
            collision: 0,
            offroad: 0,
        },
        SceneVerdict {
            collision: 0,
            offroad: 1 << 11,
        },
    ];
    let drawn = Drawn {
        x: (0..3 * 84).map(|i| i as f32).collect(),
        scene_indices: vec![7, 8, 9],
        verdicts,
        scene_alpha: 1.0 / 3.0,
    };
    let alpha = 33.0 / 36.0;
    let is = AgentLabelled::new(&drawn, Weighting::IsBalanced, &dev).unwrap();
    assert_eq!(is.kept, (3, 3));
    assert!((is.alpha - alpha).abs() < 1e-12);
    let w: Vec<Vec<f32>> = is.weights.to_vec2().unwrap();
    let y: Vec<Vec<f32>> = is.labels.to_vec2().unwrap();
    // Scene 0: vehicles 0, 1 invalid (weight 1 − α), the first 3 valid ones kept (α).
    assert_eq!(is.scene_indices, vec![7, 9]);
    assert!((w[0][0] as f64 - (1.0 - alpha)).abs() < 1e-6 && y[0][0] == 0.0);
    assert!((w[0][2] as f64 - alpha).abs() < 1e-6 && y[0][2] == 1.0);
    assert_eq!(w[0].iter().filter(|&&v| v > 0.0).count(), 5);
    // Scene 1 is all valid and the valid quota is full: left out. Scene 2: only vehicle 11.
    assert_eq!(w[1].iter().filter(|&&v| v > 0.0).count(), 1);
    assert!(w[1][11] > 0.0 && y[1][11] == 0.0);

    let plain = AgentLabelled::new(&drawn, Weighting::WithoutIs, &dev).unwrap();
    let wp: Vec<Vec<f32>> = plain.weights.to_vec2().unwrap();
    assert!(wp.iter().flatten().all(|&v| v == 0.0 || v == 1.0));
    let all = AgentLabelled::new(&drawn, Weighting::Imbalanced, &dev).unwrap();
    assert_eq!(all.kept, (33, 3));
    assert_eq!(all.scene_indices.len(), 3);

    let none_bad = Drawn {
        verdicts: vec![
            SceneVerdict {
                collision: 0,
                offroad: 0
            };
            3
        ],
        ..drawn
    };
    let e = AgentLabelled::new(&none_bad, Weighting::IsBalanced, &dev)
        .err()
        .unwrap();
    assert!(e.to_string().contains("0 invalid"), "{e}");
}
