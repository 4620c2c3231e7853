//! `pgmux demo`: a throwaway primary + replica, pgmux in front, pgbench through it.

pub async fn run() -> Result<(), String> {
    Err("demo is not built yet".into())
}
