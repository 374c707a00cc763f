//! Traffic scenes: the generator makes valid scenes, reproducibly, per split; scene sets
//! survive a save/load round trip; broken files are refused with the file named; the
//! oracle finds collisions and offroad vehicles that are put there.

use rand::rngs::StdRng;
use rand::SeedableRng;
use scoreguide_data::scenes::{generate_map, generate_scene, RoadKind};
use scoreguide_data::{MapLayers, SceneConfig, SceneSet, Split};
use scoreguide_oracles::scene::VEHICLE_FEATURES;
use scoreguide_oracles::{check_scene, Oracle, SceneOracle};
use scoreguide_train::Checkpoint;

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
fn lane_layers_follow_the_generated_vehicles() {
    let set = small_set(Split::Train, 5);
    let dev = candle_core::Device::Cpu;
    let cells = 64;
    let maps = set
        .render_maps(cells, MapLayers::RoadAndLanes, &dev)
        .unwrap();
    assert_eq!(maps.dims(), &[12, 4, cells, cells]);
    // Layer 0 is the road fraction, as the road-only rendering.
    let road = set.render_maps(cells, MapLayers::Road, &dev).unwrap();
    let first = maps.narrow(1, 0, 1).unwrap();
    let d = (first - &road).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    let v: Vec<f32> = maps.flatten_all().unwrap().to_vec1().unwrap();
    let plane = cells * cells;
    let at = |m: usize, layer: usize, k: usize| v[(m * 4 + layer) * plane + k];
    let h = set.config.half_size;
    let cell = 2.0 * h / cells as f64;
    // At each vehicle's cell the lane layer is high (vehicles sit within 0.6 m of a
    // lane centre, a cell centre within 0.71 m of the vehicle's) and the direction
    // layers point along the vehicle; on road cells at large it is lower on average.
    let (mut on_vehicles, mut aligned, mut n) = (0.0, 0, 0);
    for i in 0..set.len() {
        let m = set.map_index[i] as usize;
        for veh in set.scene(i).chunks_exact(VEHICLE_FEATURES) {
            let col = ((veh[0] as f64 + h) / cell) as usize;
            let row = ((veh[1] as f64 + h) / cell) as usize;
            let k = row * cells + col;
            on_vehicles += at(m, 1, k) as f64;
            let road = at(m, 0, k);
            let along = (at(m, 2, k) * veh[4] + at(m, 3, k) * veh[5]) / road.max(1e-6);
            aligned += usize::from(road > 0.0 && along > 0.9);
            n += 1;
        }
    }
    let on_vehicles = on_vehicles / n as f64;
    let road_cells: Vec<(usize, usize)> = (0..12)
        .flat_map(|m| (0..plane).map(move |k| (m, k)))
        .filter(|&(m, k)| at(m, 0, k) > 0.99)
        .collect();
    let on_road = road_cells
        .iter()
        .map(|&(m, k)| at(m, 1, k) as f64)
        .sum::<f64>()
        / road_cells.len() as f64;
    assert!(on_vehicles > 0.6, "lane layer at vehicles {on_vehicles}");
    assert!(
        on_vehicles > on_road + 0.15,
        "at vehicles {on_vehicles}, on road {on_road}"
    );
    assert!(
        aligned as f64 > 0.9 * n as f64,
        "{aligned} of {n} vehicles along their lane's direction"
    );

    // A scene set without its lanes (saved before they were kept) draws the road only.
    let mut old = set.clone();
    old.lanes.clear();
    assert!(old.render_maps(cells, MapLayers::Road, &dev).is_ok());
    let e = old
        .render_maps(cells, MapLayers::RoadAndLanes, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lanes"), "{e}");
}

#[test]
fn distance_layer_is_zero_on_road_and_rises_off_it() {
    let set = small_set(Split::Train, 5);
    let dev = candle_core::Device::Cpu;
    let cells = 64;
    let maps = set
        .render_maps(cells, MapLayers::RoadLanesAndDistance, &dev)
        .unwrap();
    assert_eq!(maps.dims(), &[12, 5, cells, cells]);
    // The first four layers are the lane rendering's.
    let lanes = set
        .render_maps(cells, MapLayers::RoadAndLanes, &dev)
        .unwrap();
    let d = (maps.narrow(1, 0, 4).unwrap() - &lanes)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    let v: Vec<f32> = maps.flatten_all().unwrap().to_vec1().unwrap();
    let plane = cells * cells;
    let cell = 2.0 * set.config.half_size / cells as f64;
    let reach = scoreguide_data::DISTANCE_LAYER_REACH_M;
    for m in 0..12 {
        let road = &v[m * 5 * plane..(m * 5 + 1) * plane];
        let dist = &v[(m * 5 + 4) * plane..(m * 5 + 5) * plane];
        for k in 0..plane {
            assert!(
                (0.0..=1.0).contains(&dist[k]),
                "map {m} cell {k}: {}",
                dist[k]
            );
            if road[k] == 1.0 {
                assert_eq!(dist[k], 0.0, "map {m} cell {k} is road");
            }
            // Clipped distance is 1-Lipschitz in metres: neighbours differ by at most
            // one cell side (plus half a raster cell from the block average).
            if k % cells + 1 < cells {
                let step = (dist[k + 1] - dist[k]).abs() as f64 * reach;
                assert!(step <= 1.5 * cell + 1e-4, "map {m} cell {k}: step {step} m");
            }
        }
        // Some cell is far from the road (every map has a corner off it).
        let far = dist.iter().cloned().fold(0.0, f32::max);
        assert!(far as f64 > 4.0 / reach, "map {m}: farthest {far}");
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
    assert!(set.lanes.iter().all(|l| !l.is_empty()));
    assert_eq!(SceneSet::load(&path).unwrap(), set);
    // A set saved without lanes loads without them.
    let mut old = set.clone();
    old.lanes.clear();
    let old_path = dir.join("old.safetensors");
    old.save(&old_path).unwrap();
    assert_eq!(SceneSet::load(&old_path).unwrap(), old);
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
fn vehicles_keep_the_gap_and_the_shoulder_is_drivable() {
    use scoreguide_oracles::OrientedBox;
    for (gap, shoulder) in [(2.0, 1.0), (0.5, 0.0)] {
        let cfg = SceneConfig {
            gap,
            shoulder,
            ..SceneConfig::default()
        };
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..4 {
            let map = generate_map(&cfg, &mut rng).unwrap();
            let scene = generate_scene(&cfg, &map, &mut rng).unwrap();
            let boxes: Vec<OrientedBox> = scene
                .chunks_exact(VEHICLE_FEATURES)
                .map(OrientedBox::from_features)
                .collect();
            // Grown by a little under half the gap, no two vehicles touch.
            for (i, a) in boxes.iter().enumerate() {
                for b in &boxes[i + 1..] {
                    assert!(!a.grown(0.49 * gap).overlaps(&b.grown(0.49 * gap)));
                }
            }
            // Points across each road: the lanes and the shoulder are road, a metre
            // (two cells) beyond the shoulder is not, where no other road is near.
            for road in &map.roads {
                let (x, y, heading) = road.centre.at(road.centre.length() / 2.0);
                let (nx, ny) = (-heading.sin(), heading.cos());
                let others_far = |d: f64| {
                    let (px, py) = (x + d * nx, y + d * ny);
                    map.roads
                        .iter()
                        .filter(|r| *r != road)
                        .all(|r| r.centre.distance(px, py) > r.half_width() + shoulder + 2.0)
                };
                let inside = road.half_width() + shoulder - 0.5;
                let outside = road.half_width() + shoulder + 1.0;
                for d in [inside, -inside] {
                    let (px, py) = (x + d * nx, y + d * ny);
                    if map.raster.half_size - px.abs().max(py.abs()) > 1.0 {
                        assert!(map.raster.is_road(px, py), "{d} m from {road:?}");
                    }
                }
                for d in [outside, -outside] {
                    let (px, py) = (x + d * nx, y + d * ny);
                    if others_far(d) && map.raster.half_size - px.abs().max(py.abs()) > 1.0 {
                        assert!(!map.raster.is_road(px, py), "{d} m from {road:?}");
                    }
                }
            }
        }
    }
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

/// Each vehicle's validity, scene by scene (Gen-neG's labels of scenes).
fn bits(verdicts: &[scoreguide_oracles::SceneVerdict]) -> Vec<bool> {
    verdicts
        .iter()
        .flat_map(|v| (0..12).map(move |a| v.infracting() & (1 << a) == 0))
        .collect()
}

#[test]
fn per_vehicle_training_sets_balance_and_weight() {
    use scoreguide_genneg::{ClassifierKind, Draws, LabelledSet};
    use scoreguide_oracles::SceneVerdict;
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
    let x = candle_core::Tensor::arange(0f32, 3.0 * 84.0, &dev)
        .unwrap()
        .reshape((3, 84))
        .unwrap();
    let drawn = Draws::from_rows(x.clone(), vec![7, 8, 9], bits(&verdicts), 12).unwrap();
    let alpha = 33.0 / 36.0;
    let is = LabelledSet::new(&drawn, ClassifierKind::IsBalanced).unwrap();
    assert_eq!(is.kept, (3, 3));
    assert!((is.alpha - alpha).abs() < 1e-12);
    let w: Vec<Vec<f32>> = is.weights.to_vec2().unwrap();
    let y: Vec<Vec<f32>> = is.labels.to_vec2().unwrap();
    // Scene 0: vehicles 0, 1 invalid (weight 1 − α), the first 3 valid ones kept (α).
    assert_eq!(is.keys, vec![7, 9]);
    assert!((w[0][0] as f64 - (1.0 - alpha)).abs() < 1e-6 && y[0][0] == 0.0);
    assert!((w[0][2] as f64 - alpha).abs() < 1e-6 && y[0][2] == 1.0);
    assert_eq!(w[0].iter().filter(|&&v| v > 0.0).count(), 5);
    // Scene 1 is all valid and the valid quota is full: left out. Scene 2: only vehicle 11.
    assert_eq!(w[1].iter().filter(|&&v| v > 0.0).count(), 1);
    assert!(w[1][11] > 0.0 && y[1][11] == 0.0);

    let plain = LabelledSet::new(&drawn, ClassifierKind::WithoutIs).unwrap();
    let wp: Vec<Vec<f32>> = plain.weights.to_vec2().unwrap();
    assert!(wp.iter().flatten().all(|&v| v == 0.0 || v == 1.0));
    let all = LabelledSet::new(&drawn, ClassifierKind::Imbalanced).unwrap();
    assert_eq!(all.kept, (33, 3));
    assert_eq!(all.keys.len(), 3);

    let none_bad = Draws::from_rows(x, vec![7, 8, 9], vec![true; 36], 12).unwrap();
    let e = LabelledSet::new(&none_bad, ClassifierKind::IsBalanced)
        .err()
        .unwrap();
    assert!(e.to_string().contains("0 invalid"), "{e}");
}

/// A one-step baseline and classifier on a handful of scenes: enough to check the
/// plumbing of guidance, not any quality.
fn tiny_models(
    lane_maps: bool,
) -> (
    scoreguide_experiments::traffic::TrafficData,
    Checkpoint,
    Checkpoint,
    Checkpoint,
) {
    use scoreguide_experiments::traffic::{
        train_agent_classifier, train_score, FeatureScaler, TrafficConfig, TrafficData, TrafficTask,
    };
    use scoreguide_genneg::Task;
    use scoreguide_genneg::{ClassifierKind, Draws, LabelledSet};
    let dev = candle_core::Device::Cpu;
    let set = SceneSet::generate(&SceneConfig::default(), Split::Train, 4, 8, 0).unwrap();
    let scaler = FeatureScaler::fit(&set.agents).unwrap();
    let cfg = TrafficConfig {
        batch: 4,
        iters: 1,
        ..TrafficConfig::default()
    };
    let cfg = if lane_maps {
        let probe_last = cfg
            .clone()
            .with_lane_maps()
            .with_map_probe(&scaler, set.config.half_size);
        let probe_first = cfg
            .with_map_probe(&scaler, set.config.half_size)
            .with_lane_maps();
        // The probe's 1 m grid lands on the same points whichever comes first (but for
        // its spacing, kept in metres: 2 m on the road-only maps stays 2 m).
        let (a, b) = (
            probe_last.net.map_probe.unwrap(),
            probe_first.net.map_probe.unwrap(),
        );
        for axis in 0..2 {
            assert!(
                (a.scale[axis] - b.scale[axis]).abs() < 1e-9,
                "{a:?} vs {b:?}"
            );
            assert!(
                (a.offset[axis] - b.offset[axis]).abs() < 1e-9,
                "{a:?} vs {b:?}"
            );
        }
        probe_last
    } else {
        cfg
    };
    let data = TrafficData::new(set, scaler, &cfg, &dev).unwrap();
    let base = train_score(&cfg, &data, &dev, &mut scoreguide_train::Progress::hidden()).unwrap();
    // Draws: the data's own scenes, with vehicle 0 of scene 0 marked infracting.
    let mut verdicts: Vec<scoreguide_oracles::SceneVerdict> = (0..data.set.len())
        .map(|i| check_scene(data.set.map_of(i), data.set.scene(i)))
        .collect();
    let keys: Vec<u32> = (0..8).collect();
    let x = data.x.rows(&keys).unwrap();
    // The task labels each vehicle as the oracle does.
    assert_eq!(
        TrafficTask { data: &data }.label(&x, &keys).unwrap(),
        bits(&verdicts)
    );
    verdicts[0].collision = 1;
    let drawn = Draws::from_rows(x, keys, bits(&verdicts), 12).unwrap();
    let labelled = LabelledSet::new(&drawn, ClassifierKind::IsBalanced).unwrap();
    let progress = &mut scoreguide_train::Progress::hidden();
    let clf = train_agent_classifier(&cfg, &labelled, &data, 1, 1, None, &dev, progress).unwrap();
    let ti =
        train_agent_classifier(&cfg, &labelled, &data, 1, 2, Some(0.01), &dev, progress).unwrap();
    (data, base, clf, ti)
}

#[test]
fn guided_scene_score_is_base_plus_classifier_gradient() {
    // The road-only network, and one that sees lane maps through cross-attention and
    // reads them around each vehicle with a probe.
    for lane_maps in [false, true] {
        check_guided_scene_score(lane_maps);
    }
}

fn check_guided_scene_score(lane_maps: bool) {
    use candle_core::{DType, Tensor};
    use scoreguide_experiments::traffic::{load_agent_classifier, TrafficModel};
    use scoreguide_guidance::{Cond, LogProb, Score};
    use scoreguide_nets::OnDenoised;
    let (data, base, clf, ti) = tiny_models(lane_maps);
    let dev = candle_core::Device::Cpu;
    let base = TrafficModel::load(&base, DType::F64, &dev).unwrap();
    for (kind, c) in [("time-dependent", clf), ("time-independent", ti)] {
        let name = format!("{kind} (lane maps: {lane_maps})");
        let clf = load_agent_classifier(&c).unwrap();
        assert_eq!(clf.time_independent.is_some(), kind == "time-independent");
        let idx = [0u32, 1];
        let cond = Cond::context(data.maps_of(&idx).unwrap().to_dtype(DType::F64).unwrap());
        let x = data.x.rows(&idx).unwrap().to_dtype(DType::F64).unwrap();
        let sigma = Tensor::new(&[0.3f64, 2.0], &dev).unwrap();
        let guided = base
            .with_classifiers(std::slice::from_ref(&clf), None)
            .guided_as(DType::F64, &dev)
            .unwrap();
        let plain = base.stack().guided_as(DType::F64, &dev).unwrap();
        let g = guided.score_with(&x, &sigma, &cond).unwrap();
        let s = plain.score_with(&x, &sigma, &cond).unwrap();
        let net = clf.build(DType::F64, &dev).unwrap();
        let term: Box<dyn LogProb> = match clf.time_independent {
            None => Box::new(net),
            Some(sigma_clean) => Box::new(OnDenoised {
                base: base.stack().guided_as(DType::F64, &dev).unwrap(),
                classifier: net,
                sigma_clean,
            }),
        };
        let lp = |x: &Tensor| -> Vec<f64> {
            term.log_prob_with(x, &sigma, &cond)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert!(
            lp(&x).iter().all(|v| *v <= 0.0),
            "{name}: log C must be ≤ 0"
        );
        let diff: Vec<Vec<f64>> = (&g - &s).unwrap().to_vec2().unwrap();
        let base_x: Vec<Vec<f64>> = x.to_vec2().unwrap();
        for &(row, k) in &[(0usize, 0usize), (0, 1), (1, 30), (1, 83)] {
            let at = |h: f64| {
                let mut v = base_x.clone();
                v[row][k] += h;
                lp(&Tensor::new(v, &dev).unwrap())[row]
            };
            let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!(
                (fd - diff[row][k]).abs() < 1e-5 * (1.0 + fd.abs()),
                "{name}, row {row}, value {k}: finite difference {fd} vs guided − base {}",
                diff[row][k]
            );
        }
    }
}

#[test]
fn a_gated_stack_is_the_baseline_above_its_gate_and_guided_below() {
    use candle_core::{DType, Tensor};
    use scoreguide_experiments::traffic::{load_agent_classifier, TrafficModel};
    use scoreguide_guidance::{Cond, Score};
    let (data, base, clf, _) = tiny_models(true);
    let dev = candle_core::Device::Cpu;
    let base = TrafficModel::load(&base, DType::F64, &dev).unwrap();
    let clf = [load_agent_classifier(&clf).unwrap()];
    let idx = [0u32, 1, 2, 3];
    let cond = Cond::context(data.maps_of(&idx).unwrap().to_dtype(DType::F64).unwrap());
    let x = data.x.rows(&idx).unwrap().to_dtype(DType::F64).unwrap();
    let rows = |t: &Tensor| -> Vec<Vec<f64>> { t.to_vec2().unwrap() };
    let denoised = |s: &dyn Score, sigma: &[f64]| {
        rows(
            &s.denoise_with(&x, &Tensor::new(sigma, &dev).unwrap(), &cond)
                .unwrap(),
        )
    };
    let build = |gate| {
        base.with_classifiers(&clf, gate)
            .guided_as(DType::F64, &dev)
            .unwrap()
    };
    let (gated, ungated) = (build(Some(1.0)), build(None));
    let base = base.stack().guided_as(DType::F64, &dev).unwrap();

    // Mixed noise levels (a distillation batch): rows 0 and 2 are gated in.
    let mixed = [0.3, 2.0, 0.05, 5.0];
    let (g, u, b) = (
        denoised(&gated, &mixed),
        denoised(&ungated, &mixed),
        denoised(&base, &mixed),
    );
    for r in [1, 3] {
        assert_eq!(
            g[r], b[r],
            "row {r} is above the gate: the baseline's, to the bit"
        );
    }
    for r in [0, 2] {
        assert_ne!(g[r], b[r], "row {r}: the classifier must act (not vacuous)");
        for (k, (a, e)) in g[r].iter().zip(&u[r]).enumerate() {
            assert!(
                (a - e).abs() < 1e-12,
                "row {r}, value {k}: {a} vs ungated {e}"
            );
        }
    }
    // One noise level for the batch (a sampler's step): all rows in, or none.
    assert_eq!(denoised(&gated, &[0.5; 4]), denoised(&ungated, &[0.5; 4]));
    assert_eq!(denoised(&gated, &[3.0; 4]), denoised(&base, &[3.0; 4]));
}

#[test]
fn vehicle_rates_count_vehicles_and_scene_rates_scenes() {
    use scoreguide_experiments::traffic::{
        label_scenes, FeatureScaler, TrafficConfig, TrafficData,
    };
    let dev = candle_core::Device::Cpu;
    let set = SceneSet::generate(&SceneConfig::default(), Split::Train, 2, 4, 3).unwrap();
    let scaler = FeatureScaler::fit(&set.agents).unwrap();
    let data = TrafficData::new(set, scaler, &TrafficConfig::default(), &dev).unwrap();
    let mut agents = data.set.agents.clone();
    // Scene 1: vehicles 0 and 5 off the map (far apart, so no collision between them).
    let dim = data.set.scene_dim();
    agents[dim] = 500.0;
    agents[dim + 5 * 7] = -500.0;
    let idx: Vec<u32> = (0..4).collect();
    let (r, verdicts) = label_scenes(&data, &idx, &agents).unwrap();
    assert_eq!(verdicts[1].offroad, 1 | (1 << 5));
    assert_eq!((r.offroad, r.infraction, r.collision), (0.25, 0.25, 0.0));
    assert!((r.vehicle_offroad - 2.0 / 48.0).abs() < 1e-12, "{r:?}");
    assert_eq!(r.vehicle_infraction, r.vehicle_offroad);
    assert_eq!(r.vehicle_collision, 0.0);
}

#[test]
fn classifier_check_groups_vehicles_by_verdict() {
    use candle_core::{DType, Tensor};
    use scoreguide_experiments::traffic::{
        check_agent_classifier, load_agent_classifier, JudgedScenes, TrafficModel,
    };
    use scoreguide_genneg::Draws;
    use scoreguide_metrics::roc_auc;
    use scoreguide_oracles::SceneVerdict;
    let (data, base, clf, _) = tiny_models(true);
    let dev = candle_core::Device::Cpu;
    let base = TrafficModel::load(&base, DType::F32, &dev).unwrap();
    let clf = load_agent_classifier(&clf).unwrap();
    let idx: Vec<u32> = vec![0, 1, 2];
    let x = data.x.rows(&idx).unwrap();
    // Scene 0: vehicle 0 colliding; scene 2: vehicle 3 offroad and colliding.
    let mut verdicts = vec![SceneVerdict::default(); 3];
    verdicts[0].collision = 1;
    verdicts[2].collision = 1 << 3;
    verdicts[2].offroad = 1 << 3;
    let drawn = Draws::from_rows(x.clone(), idx.clone(), bits(&verdicts), 12).unwrap();
    let mut judged = JudgedScenes { drawn, verdicts };
    // At a negligible σ the check sees the clean scenes: compare with the logits.
    let tiny = 1e-12;
    let rows = check_agent_classifier(&clf, &base, &judged, &data, &[tiny, 0.5], 4, 2).unwrap();
    assert_eq!(rows.len(), 2);
    let sigma = Tensor::full(tiny as f32, 3, &dev).unwrap();
    let logits: Vec<Vec<f32>> = clf
        .build(DType::F32, &dev)
        .unwrap()
        .logits(&x, &sigma, &data.cond_of(&idx).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap();
    let p = |l: f32| 1.0 / (1.0 + (-(l as f64)).exp());
    let valid: Vec<f64> = (0..3)
        .flat_map(|i| (0..12).map(move |a| (i, a)))
        .filter(|&(i, a)| !((i == 0 && a == 0) || (i == 2 && a == 3)))
        .map(|(i, a)| logits[i][a] as f64)
        .collect();
    assert_eq!(valid.len(), 34);
    let r = &rows[0];
    let mean_valid = valid.iter().map(|&l| p(l as f32)).sum::<f64>() / 34.0;
    assert!((r.p_valid[0].unwrap() - mean_valid).abs() < 1e-5, "{r:?}");
    let colliding = [logits[0][0] as f64, logits[2][3] as f64];
    let mean_colliding = (p(logits[0][0]) + p(logits[2][3])) / 2.0;
    assert!(
        (r.p_valid[1].unwrap() - mean_colliding).abs() < 1e-5,
        "{r:?}"
    );
    assert!(
        (r.p_valid[2].unwrap() - p(logits[2][3])).abs() < 1e-5,
        "{r:?}"
    );
    let auc = roc_auc(&valid, &colliding).unwrap();
    assert!(
        (r.auc_collision.unwrap() - auc).abs() < 1e-9,
        "{r:?} vs {auc}"
    );
    // Noise changes what the classifier sees; every figure stays a probability.
    let noisy = &rows[1];
    assert_eq!(noisy.sigma, 0.5);
    for v in noisy
        .p_valid
        .iter()
        .chain([&noisy.auc_collision, &noisy.auc_offroad])
    {
        let v = v.unwrap();
        assert!((0.0..=1.0).contains(&v), "{noisy:?}");
    }
    // No offroad vehicle: no offroad figures, not a made-up one.
    judged.verdicts[2].offroad = 0;
    let rows = check_agent_classifier(&clf, &base, &judged, &data, &[0.1], 4, 8).unwrap();
    assert_eq!((rows[0].p_valid[2], rows[0].auc_offroad), (None, None));
    let e = check_agent_classifier(&clf, &base, &judged, &data, &[f64::NAN], 4, 8)
        .err()
        .unwrap();
    assert!(e.to_string().contains("σ must be positive"), "{e}");
}

#[test]
fn baseline_training_resumed_from_a_saved_state_is_the_uninterrupted_run() {
    use scoreguide_experiments::traffic::{
        train_score, train_score_resumable, FeatureScaler, TrafficConfig, TrafficData,
    };
    let dev = candle_core::Device::Cpu;
    let set = SceneSet::generate(&SceneConfig::default(), Split::Train, 2, 8, 5).unwrap();
    let scaler = FeatureScaler::fit(&set.agents).unwrap();
    // The full run's network: lane maps read by the probe, whose scale and offset are
    // floats that must come back from the saved configuration to the bit, or the state
    // is refused as another configuration's.
    let cfg = TrafficConfig {
        batch: 4,
        iters: 5,
        ..TrafficConfig::default()
    }
    .with_lane_maps()
    .with_map_probe(&scaler, set.config.half_size);
    let data = TrafficData::new(set, scaler, &cfg, &dev).unwrap();
    let hidden = &mut scoreguide_train::Progress::hidden();
    let whole = train_score(&cfg, &data, &dev, hidden).unwrap();
    // Saved every 2 steps: states after steps 2, 4 and 5.
    let mut saved: Vec<Checkpoint> = Vec::new();
    let staged = train_score_resumable(
        &cfg,
        &data,
        None,
        2,
        &mut |c| {
            saved.push(c.clone());
            Ok(())
        },
        &dev,
        hidden,
    )
    .unwrap();
    let steps: Vec<u64> = saved.iter().map(|c| c.meta("step").unwrap()).collect();
    assert_eq!(steps, vec![2, 4, 5]);
    // Interrupted after step 2 and resumed (saving every 3 from there: at 3 and 5).
    let resumed = train_score_resumable(
        &cfg,
        &data,
        Some(&saved[0]),
        3,
        &mut |_| Ok(()),
        &dev,
        hidden,
    )
    .unwrap();
    for c in [&staged, &resumed] {
        assert_eq!(c.meta::<u64>("step").unwrap(), 5);
        assert_same_training_state(&whole, c);
    }
    // A state of another configuration, or one past the end, is refused by name.
    let mut refused = |cfg: &TrafficConfig, resume: Option<&Checkpoint>, every: u64| -> String {
        train_score_resumable(cfg, &data, resume, every, &mut |_| Ok(()), &dev, hidden)
            .expect_err("refused")
            .to_string()
    };
    let other = TrafficConfig {
        lr: 1e-3,
        ..cfg.clone()
    };
    let e = refused(&other, Some(&saved[0]), 2);
    assert!(e.contains("resumed baseline"), "{e}");
    let short = TrafficConfig {
        iters: 3,
        ..cfg.clone()
    };
    let e = refused(&short, Some(&saved[1]), 2);
    assert!(e.contains("done 4 steps"), "{e}");
    let e = refused(&cfg, None, 0);
    assert!(e.contains("save_every"), "{e}");
}

#[test]
fn distillation_extended_from_a_shorter_one_is_the_uninterrupted_run() {
    use candle_core::DType;
    use scoreguide_experiments::traffic::{
        distill, distill_resumable, load_agent_classifier, TrafficConfig, TrafficModel,
    };
    let (data, base_ckpt, clf, _) = tiny_models(true);
    let dev = candle_core::Device::Cpu;
    let base = TrafficModel::load(&base_ckpt, DType::F32, &dev).unwrap();
    let clf = [load_agent_classifier(&clf).unwrap()];
    let teacher = base.with_classifiers(&clf, Some(1.0)).guided(&dev).unwrap();
    let cfg = |iters| TrafficConfig {
        iters,
        ..base.config.clone()
    };
    let hidden = &mut scoreguide_train::Progress::hidden();
    let whole = distill(&cfg(4), &teacher, &base_ckpt, &data, &dev, hidden).unwrap();
    // A finished 2-step distillation, then extended to 4 steps (saving at 3 and 4).
    let short = distill(&cfg(2), &teacher, &base_ckpt, &data, &dev, hidden).unwrap();
    let mut saved = Vec::new();
    let extended = distill_resumable(
        &cfg(4),
        &teacher,
        &base_ckpt,
        &data,
        Some(&short),
        1,
        &mut |c| {
            saved.push(c.meta::<u64>("step")?);
            Ok(())
        },
        &dev,
        hidden,
    )
    .unwrap();
    assert_eq!(saved, vec![3, 4]);
    assert_same_training_state(&whole, &extended);
    // The distillation moved the student off the baseline (the test is not vacuous).
    let moved = |c: &Checkpoint| -> f32 {
        let (a, b) = (base_ckpt.section("ema"), c.section("ema"));
        a.iter()
            .map(|(n, t)| {
                (t - &b[n])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .fold(0.0, f32::max)
    };
    assert!(moved(&whole) > 0.0);
    // Past the end, or another configuration: refused by name.
    let mut refused = |cfg: &TrafficConfig| -> String {
        distill_resumable(
            cfg,
            &teacher,
            &base_ckpt,
            &data,
            Some(&short),
            1,
            &mut |_| Ok(()),
            &dev,
            hidden,
        )
        .expect_err("refused")
        .to_string()
    };
    let e = refused(&cfg(1));
    assert!(
        e.contains("resumed distillation") && e.contains("done 2 steps"),
        "{e}"
    );
    let e = refused(&TrafficConfig { lr: 1e-3, ..cfg(4) });
    assert!(e.contains("resumed distillation"), "{e}");
}

/// Weights, EMA and Adam moments of `b` are those of `a` to the bit.
fn assert_same_training_state(a: &Checkpoint, b: &Checkpoint) {
    for prefix in ["model", "ema", "adam.m", "adam.v"] {
        let (a, b) = (a.section(prefix), b.section(prefix));
        assert_eq!(a.len(), b.len(), "{prefix}");
        for (name, t) in &a {
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(x, y, "{prefix}.{name} differs from the uninterrupted run");
        }
    }
}

#[test]
fn nearest_road_cell_and_the_offroad_pull_find_the_road() {
    use candle_core::DType;
    use scoreguide_experiments::traffic::{
        load_agent_classifier, nearest_road_cell, offroad_pull, TrafficModel,
    };
    use scoreguide_oracles::RoadRaster;
    // Road on the left half of a 4 × 4 m map of 1 m cells.
    let map = RoadRaster::from_fn(2.0, 4, |x, _| x < 0.0);
    assert_eq!(nearest_road_cell(&map, 1.7, 1.2), Some((-0.5, 1.5)));
    assert_eq!(nearest_road_cell(&map, -1.2, -0.3), Some((-1.5, -0.5)));
    assert_eq!(
        nearest_road_cell(&RoadRaster::from_fn(2.0, 4, |_, _| false), 0.0, 0.0),
        None
    );

    let (data, base, clf, _) = tiny_models(true);
    let dev = candle_core::Device::Cpu;
    let base = TrafficModel::load(&base, DType::F32, &dev).unwrap();
    let clf = load_agent_classifier(&clf).unwrap();
    let idx: Vec<u32> = vec![0, 1];
    let mut agents = data.set.agents[..2 * data.set.scene_dim()].to_vec();
    // Scene 1, vehicle 1: moved to the first off-road cell of its map, far from the
    // vehicles; scene 0, vehicle 0: marked offroad where it stands (on the road).
    let map1 = data.set.map_of(1);
    let off = (0..map1.road.len()).find(|&i| !map1.road[i]).unwrap();
    let side = map1.cell_size();
    let (ox, oy) = (
        -map1.half_size + ((off % map1.cells) as f64 + 0.5) * side,
        -map1.half_size + ((off / map1.cells) as f64 + 0.5) * side,
    );
    let k = data.set.scene_dim() + 7;
    agents[k] = ox as f32;
    agents[k + 1] = oy as f32;
    let (rx, ry) = nearest_road_cell(map1, ox, oy).unwrap();
    let distance = (rx - ox).hypot(ry - oy);
    let mut verdicts = vec![scoreguide_oracles::SceneVerdict::default(); 2];
    verdicts[0].offroad = 1;
    verdicts[1].offroad = 1 << 1;
    let x = candle_core::Tensor::from_vec(
        base.scaler.normalize(&agents),
        (2, data.set.scene_dim()),
        &dev,
    )
    .unwrap();
    let drawn = scoreguide_genneg::Draws::from_rows(x, idx, bits(&verdicts), 12).unwrap();
    let judged = scoreguide_experiments::traffic::JudgedScenes { drawn, verdicts };
    let near_m = distance + 1.0;
    let p = offroad_pull(&clf, &base, &judged, &data, 0.01, near_m, 1).unwrap();
    assert_eq!((p.centre_on_road, p.near, p.far), (1, 1, 0), "{p:?}");
    assert!(
        (p.median_distance_m.unwrap() - distance).abs() < 1e-3,
        "{p:?}"
    );
    let cos = p.cos_near.unwrap();
    assert!((-1.0 - 1e-9..=1.0 + 1e-9).contains(&cos), "{p:?}");
    assert!(p.pull_near.unwrap() >= 0.0 && p.cos_far.is_none());
    // Closer than the vehicle's distance: the same vehicle counts as far.
    let p = offroad_pull(&clf, &base, &judged, &data, 0.01, distance / 2.0, 8).unwrap();
    assert_eq!((p.near, p.far), (0, 1), "{p:?}");
    assert!(offroad_pull(&clf, &base, &judged, &data, -1.0, 1.0, 8).is_err());
}

#[test]
fn appended_scenes_keep_their_maps_and_the_scaler() {
    use scoreguide_experiments::traffic::{FeatureScaler, TrafficConfig, TrafficData};
    let dev = candle_core::Device::Cpu;
    let set = SceneSet::generate(&SceneConfig::default(), Split::Train, 2, 4, 3).unwrap();
    let scaler = FeatureScaler::fit(&set.agents).unwrap();
    let cfg = TrafficConfig::default();
    let data = TrafficData::new(set, scaler, &cfg, &dev).unwrap();
    let dim = data.set.scene_dim();
    // Scenes 3 and 0's vehicles, shifted 1 m, appended twice on those scenes' maps.
    let picked = [3u32, 0];
    let agents: Vec<f32> = picked
        .iter()
        .flat_map(|&i| data.set.scene(i as usize).iter().map(|v| v + 1.0))
        .collect();
    let more = data.with_scenes(&picked, &agents, 2).unwrap();
    assert_eq!(more.set.len(), 8);
    assert_eq!(more.scaler, data.scaler);
    let m = &data.set.map_index;
    assert_eq!(&more.set.map_index[..4], &m[..]);
    assert_eq!(&more.set.map_index[4..], &[m[3], m[0], m[3], m[0]]);
    let x = more.x.rows(&[5, 7]).unwrap().to_vec2::<f32>().unwrap();
    let want = data.scaler.normalize(&agents[dim..]);
    assert_eq!(x[0], want);
    assert_eq!(x[1], want);
    // The maps come with the scenes.
    let diff = (more.maps_of(&[4]).unwrap() - data.maps_of(&[3]).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // Bad input is named.
    let e = data.with_scenes(&picked, &agents[..dim], 1).err().unwrap();
    assert!(e.to_string().contains("appended scenes"), "{e}");
    let e = data.with_scenes(&[9, 0], &agents, 1).err().unwrap();
    assert!(e.to_string().contains("scene index 9"), "{e}");
    let mut nan = agents.clone();
    nan[2] = f32::NAN;
    let e = data.with_scenes(&picked, &nan, 1).err().unwrap();
    assert!(e.to_string().contains("NaN"), "{e}");
}

/// The committed run's models (runs/traffic-lu-s1), written before the run record
/// existed, still load and pass or fail the reuse checks by their older keys.
#[test]
fn the_committed_run_reads_through_its_older_keys() {
    use scoreguide_experiments::traffic::run::{load_baseline, recorded_genneg_seed};
    use scoreguide_experiments::traffic::{load_agent_classifier, TrafficModel};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runs/traffic-lu-s1");
    let scenes = SceneConfig::default();
    let base = load_baseline(&dir.join("baseline.safetensors"), &scenes).unwrap();
    let model =
        TrafficModel::load(&base, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    assert_eq!(model.params, 135_687);
    let other = SceneConfig {
        gap: 0.5,
        ..SceneConfig::default()
    };
    let e = load_baseline(&dir.join("baseline.safetensors"), &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.gap"), "{e}");
    let clf = Checkpoint::load(dir.join("genneg_1.safetensors")).unwrap();
    assert_eq!(recorded_genneg_seed(&clf).unwrap(), Some(1));
    assert!(load_agent_classifier(&clf)
        .unwrap()
        .time_independent
        .is_none());
}
