//! Property tests of the noise processes and σ grids.

use proptest::prelude::*;
use scoreguide_sde::{karras, log_linear, uniform_t, BetaSchedule, Ddpm, Process};

fn processes() -> impl Strategy<Value = Process> {
    prop_oneof![
        (1e-3f64..1.0, 2.0f64..100.0).prop_map(|(a, b)| Process::ve(a, b)),
        (0.01f64..1.0, 1.0f64..30.0).prop_map(|(a, b)| Process::vp(a, b)),
        (0.01f64..1.0, 1.0f64..30.0).prop_map(|(a, b)| Process::sub_vp(a, b)),
        (1e-3f64..1.0, 2.0f64..100.0).prop_map(|(a, b)| Process::edm(a, b)),
        (10usize..2000).prop_map(|n| Process::ddpm_linear(n).unwrap()),
        (10usize..2000, 1e-4f64..0.1)
            .prop_map(|(n, s)| Process::Ddpm(Ddpm::new(n, BetaSchedule::Cosine { s }).unwrap())),
    ]
}

proptest! {
    #[test]
    fn sigma_is_monotone_and_invertible(p in processes(), u in 0.0f64..1.0, v in 0.0f64..1.0) {
        let (t0, t1) = p.t_range();
        let (a, b) = (t0 + u.min(v) * (t1 - t0), t0 + u.max(v) * (t1 - t0));
        prop_assume!(b - a > 1e-6 * (t1 - t0));
        prop_assert!(p.sigma(a) < p.sigma(b), "{p:?}: σ({a}) = {} ≥ σ({b}) = {}", p.sigma(a), p.sigma(b));
        for t in [a, b] {
            let back = p.t_of_sigma(p.sigma(t));
            prop_assert!((back - t).abs() <= 1e-7 * (1.0 + t.abs()), "{p:?}: t {t} → σ → t {back}");
        }
    }

    #[test]
    fn vp_alpha_and_std_are_on_the_unit_circle(bmin in 0.01f64..1.0, bmax in 1.0f64..30.0, t in 1e-5f64..1.0) {
        let p = Process::vp(bmin, bmax);
        let (a, s) = (p.alpha(t), p.sigma(t));
        prop_assert!((a * a + (a * s).powi(2) - 1.0).abs() < 1e-12);
        prop_assert!((p.alpha_at_sigma(s) - a).abs() < 1e-12);
    }

    #[test]
    fn ddpm_alpha_and_std_are_on_the_unit_circle(n in 10usize..1000, t in 0.0f64..1.0) {
        let p = Process::ddpm_linear(n).unwrap();
        let t = t * (n - 1) as f64;
        let (a, s) = (p.alpha(t), p.sigma(t));
        prop_assert!((a * a + (a * s).powi(2) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn grids_run_from_sigma_max_to_sigma_min(n in 2usize..500, lo in 1e-4f64..1.0, span in 1.01f64..1e4, rho in 1.0f64..10.0) {
        let hi = lo * span;
        for g in [karras(n, lo, hi, rho).unwrap(), log_linear(n, lo, hi).unwrap()] {
            prop_assert_eq!(g.len(), n);
            prop_assert_eq!(g[0], hi);
            prop_assert_eq!(g[n - 1], lo);
            prop_assert!(g.windows(2).all(|w| w[1] < w[0]));
        }
        let p = Process::ve(lo, hi);
        let g = uniform_t(&p, n, 0.0, 1.0).unwrap();
        prop_assert!((g[0] - hi).abs() <= 1e-9 * hi && (g[n - 1] - lo).abs() <= 1e-9 * lo);
        prop_assert!(g.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn cosine_betas_are_strictly_inside_unit_interval(n in 2usize..5000, s in 1e-5f64..0.5) {
        let d = Ddpm::new(n, BetaSchedule::Cosine { s }).unwrap();
        prop_assert!(d.betas().iter().all(|b| *b > 0.0 && *b < 1.0));
        prop_assert!(d.sigmas().windows(2).all(|w| w[1] > w[0]));
    }
}

#[test]
fn bad_process_parameters_are_rejected() {
    assert!(Process::ve(1.0, 0.5).validate().is_err());
    assert!(Process::vp(-0.1, 20.0).validate().is_err());
    assert!(karras(1, 0.1, 1.0, 7.0).is_err());
    assert!(log_linear(10, 0.0, 1.0).is_err());
    assert!(Ddpm::new(1, BetaSchedule::Cosine { s: 0.008 }).is_err());
    assert!(Ddpm::new(
        10,
        BetaSchedule::Linear {
            beta_start: 0.5,
            beta_end: 0.1
        }
    )
    .is_err());
}
