//! What unit tests share: a store on a real etcd child on 127.0.0.1, the
//! integration tests' [`skiff_tests::Etcd`].

use std::time::Duration;

pub use skiff_tests::Etcd;

use crate::storage::Store;

/// A store on `etcd`, once it answers (within 10 s).
pub async fn store(etcd: &Etcd) -> Store {
    for _ in 0..100 {
        if let Ok(s) = Store::connect(&[etcd.url()]).await
            && s.healthy().await
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd at {} did not answer within 10s", etcd.url());
}
