//! Area under the ROC curve by ranks (the Mann–Whitney statistic).

use candle_core::{bail, Result};

/// ROC AUC of `positive` scores against `negative` ones: the probability that a random
/// positive scores above a random negative, ties counting one half. Computed from the
/// rank sum of the positives (ties get their average rank), O(n log n).
///
/// ```
/// use scoreguide_metrics::roc_auc;
/// assert_eq!(roc_auc(&[0.9, 0.8], &[0.1, 0.2]).unwrap(), 1.0);
/// assert_eq!(roc_auc(&[0.5], &[0.5]).unwrap(), 0.5);
/// // One of the four pairs is out of order.
/// assert_eq!(roc_auc(&[0.9, 0.3], &[0.1, 0.4]).unwrap(), 0.75);
/// ```
pub fn roc_auc(positive: &[f64], negative: &[f64]) -> Result<f64> {
    if positive.is_empty() || negative.is_empty() {
        bail!(
            "roc_auc: need positive and negative scores, got {} positive and {} negative",
            positive.len(),
            negative.len()
        );
    }
    for (name, s) in [("positive", positive), ("negative", negative)] {
        if let Some(i) = s.iter().position(|v| !v.is_finite()) {
            bail!("roc_auc: {name} score {i} is {}", s[i]);
        }
    }
    let mut all: Vec<(f64, bool)> = positive
        .iter()
        .map(|&v| (v, true))
        .chain(negative.iter().map(|&v| (v, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of the positives' (1-based, tie-averaged) ranks.
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < all.len() {
        let mut end = start + 1;
        while end < all.len() && all[end].0 == all[start].0 {
            end += 1;
        }
        let mean_rank = (start + 1 + end) as f64 / 2.0;
        rank_sum += mean_rank * all[start..end].iter().filter(|p| p.1).count() as f64;
        start = end;
    }
    let (np, nn) = (positive.len() as f64, negative.len() as f64);
    Ok((rank_sum - np * (np + 1.0) / 2.0) / (np * nn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, pair by pair.
    fn by_pairs(p: &[f64], n: &[f64]) -> f64 {
        let mut s = 0.0;
        for &a in p {
            for &b in n {
                s += if a > b {
                    1.0
                } else if a == b {
                    0.5
                } else {
                    0.0
                };
            }
        }
        s / (p.len() * n.len()) as f64
    }

    proptest! {
        #[test]
        fn matches_the_pairwise_definition(
            p in prop::collection::vec(0i32..20, 1..30),
            n in prop::collection::vec(0i32..20, 1..30),
        ) {
            // Small integers: many ties.
            let p: Vec<f64> = p.into_iter().map(f64::from).collect();
            let n: Vec<f64> = n.into_iter().map(f64::from).collect();
            let auc = roc_auc(&p, &n).unwrap();
            prop_assert!((auc - by_pairs(&p, &n)).abs() < 1e-12);
            // Swapping the classes mirrors it.
            prop_assert!((auc + roc_auc(&n, &p).unwrap() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn bad_input_is_named() {
        let e = roc_auc(&[], &[1.0]).unwrap_err().to_string();
        assert!(e.contains("0 positive"), "{e}");
        let e = roc_auc(&[1.0], &[0.0, f64::NAN]).unwrap_err().to_string();
        assert!(e.contains("negative score 1"), "{e}");
    }
}
