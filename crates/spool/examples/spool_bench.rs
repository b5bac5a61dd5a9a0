//! How many messages a second the spool makes durable, from 1 and from 20
//! concurrent writers, the way `docs/disk.md` measured the raw disk.
//!
//! ```text
//! cargo run --release -p spool --example spool_bench -- [DIR] [SIZE_BYTES] [SECONDS]
//! ```

use std::time::{Duration, Instant};

use spool::{Envelope, Spool};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let size: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    for writers in [1usize, 20] {
        let dir = tempfile::tempdir_in(&base).expect("temp dir");
        let (spool, _) = Spool::open(dir.path()).expect("open spool");
        let body = vec![b'x'; size];
        let deadline = Instant::now() + Duration::from_secs(secs);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..writers {
            let spool = spool.clone();
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let mut w = spool.begin(spool::Reserve::Respect);
                    w.write(&body).await.expect("write");
                    let id = w
                        .commit(
                            Envelope::new("a@example.com", ["b@example.com".to_string()]),
                            spool::DeliveryRecord::default(),
                        )
                        .await
                        .expect("commit");
                    lat.push(t.elapsed());
                    spool.remove(id).await.expect("remove");
                    n += 1;
                }
                (n, lat)
            }));
        }
        let mut total = 0;
        let mut lat = Vec::new();
        for t in tasks {
            let (n, l) = t.await.expect("task");
            total += n;
            lat.extend(l);
        }
        let elapsed = start.elapsed().as_secs_f64();
        lat.sort();
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        println!(
            "{writers:>2} writers, {size} B: {:>8.0} commits/s (+ removes), commit p50 {:?} p99 {:?}",
            total as f64 / elapsed,
            p(0.5),
            p(0.99)
        );
        spool.close().await.expect("close");
    }
}
