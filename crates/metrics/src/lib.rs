//! Metrics for generative models.
//!
//! [`Rate`] is a proportion with its Wilson 95% interval, used for infraction rates:
//! the fraction of samples an oracle rejects ([`infraction_rate`]).
//!
//! ```
//! use scoreguide_metrics::Rate;
//! let r = Rate::new(50, 1000).unwrap();
//! assert_eq!(r.rate, 0.05);
//! // Wilson interval for 50/1000, by hand from Wilson (1927): centre ± half-width.
//! assert!((r.ci95.0 - 0.038130).abs() < 1e-5 && (r.ci95.1 - 0.065314).abs() < 1e-5);
//! ```

mod infraction;

pub use infraction::{infraction_rate, parallel_samples_needed, Rate};
