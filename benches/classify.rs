//! Classifier cost per statement: `cargo bench --bench classify`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pgmux::sql::{Class, WriteFunctions, classify};

const CASES: &[(&str, &str, Class)] = &[
    ("pgbench_select", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;", Class::Read),
    ("pgbench_update", "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;", Class::Write),
    (
        "orm_select_400b",
        r#"SELECT "orders"."id", "orders"."status", "orders"."total_cents", "orders"."created_at", "customers"."email", "customers"."name", COUNT("order_items"."id") AS "item_count" FROM "orders" INNER JOIN "customers" ON "customers"."id" = "orders"."customer_id" LEFT OUTER JOIN "order_items" ON "order_items"."order_id" = "orders"."id" WHERE "orders"."status" IN ($1, $2) AND "customers"."region" = $3 GROUP BY "orders"."id", "customers"."id" ORDER BY "orders"."created_at" DESC LIMIT $4"#,
        Class::Read,
    ),
    (
        "five_statements",
        "BEGIN; SELECT abalance FROM pgbench_accounts WHERE aid = 1; UPDATE pgbench_tellers SET tbalance = tbalance + 5 WHERE tid = 2; INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (2, 1, 1, 5, CURRENT_TIMESTAMP); COMMIT;",
        Class::Write,
    ),
    ("hinted_select", "/* pgmux:replica */ SELECT id, name FROM users WHERE id = $1", Class::Read),
];

fn bench(c: &mut Criterion) {
    let wf = WriteFunctions::new(["audit_log", "billing.charge"]);
    let mut g = c.benchmark_group("classify");
    for &(name, sql, want) in CASES {
        assert_eq!(classify(sql.as_bytes(), &wf).class, want, "{name}");
        g.throughput(Throughput::Bytes(sql.len() as u64));
        g.bench_function(name, |b| b.iter(|| classify(black_box(sql.as_bytes()), &wf)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
