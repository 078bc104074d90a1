//! Every eviction policy of the RAM tier keeps the tier contract.

use std::sync::Arc;

use osstream_core::{EvictionPolicy, RamTier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_passes_the_tier_suite() {
    for policy in EvictionPolicy::ALL {
        osstream_testkit::conformance::tier_suite(Arc::new(RamTier::with_policy(
            256 * 1024,
            policy,
        )))
        .await;
    }
}
