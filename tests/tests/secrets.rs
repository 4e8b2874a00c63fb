//! No secret leaves a run: a `pleura-worker` process with its RabbitMQ and
//! Redis credentials read from files (as Kubernetes mounts Secrets), logging
//! at debug level, answers a good scan and a poison one. Then its log, its
//! `/metrics`, every key it wrote in Redis (results, stream, heartbeat) and
//! the CLI's outputs, including a refused login, are searched for the
//! password. The users are real: a RabbitMQ user made with `rabbitmqctl`
//! and a Redis ACL user, both removed afterwards.

use std::time::Duration;

use pleura::wire::{Priority, Status};
use pleura_tests::*;

/// `url` with its user and password replaced.
fn with_login(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}:{password}@{host}")
}

/// A Redis reply as text, strings decoded (a debug print would show bytes).
fn text_of(v: &redis::Value) -> String {
    use redis::Value::*;
    match v {
        BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        SimpleString(s) => s.clone(),
        VerbatimString { text, .. } => text.clone(),
        Array(items) | Set(items) => items.iter().map(text_of).collect::<Vec<_>>().join(" "),
        Map(pairs) => pairs
            .iter()
            .map(|(k, v)| format!("{} {}", text_of(k), text_of(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => format!("{other:?}"),
    }
}

/// Every value under the namespace in Redis, as text.
async fn redis_dump(con: &mut redis::aio::MultiplexedConnection, ns: &str) -> String {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:*"))
        .query_async(con)
        .await
        .expect("KEYS");
    let mut dump = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(con)
            .await
            .expect("TYPE");
        let value: redis::Value = match kind.as_str() {
            "string" => redis::cmd("GET").arg(&key).query_async(con).await,
            "stream" => {
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(con)
                    .await
            }
            "hash" => redis::cmd("HGETALL").arg(&key).query_async(con).await,
            "set" => redis::cmd("SMEMBERS").arg(&key).query_async(con).await,
            "list" => {
                redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(con)
                    .await
            }
            _ => redis::cmd("DUMP").arg(&key).query_async(con).await,
        }
        .expect("read key");
        dump.push_str(&format!("{key} = {}\n", text_of(&value)));
    }
    dump
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_output_of_a_run_carries_the_password() {
    let fleet = Fleet::new("secrets", 8);
    let ns = fleet.names.namespace().to_string();
    let user = format!("pleura-{ns}");
    let password = format!("Pw{}", uuid::Uuid::new_v4().simple());

    // The broker user. Without rabbitmqctl (another host's broker) the test
    // cannot make one: say so loudly rather than pass.
    if let Err(e) = rabbitmqctl(&["add_user", &user, &password]) {
        panic!("cannot create a RabbitMQ user for the test: {e}");
    }
    struct DropUser(String);
    impl Drop for DropUser {
        fn drop(&mut self) {
            let _ = rabbitmqctl(&["delete_user", &self.0]);
        }
    }
    let _broker_user = DropUser(user.clone());
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]).expect("permissions");

    // The Redis user.
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut con)
        .await
        .expect("ACL SETUSER");

    let dir = fleet.tmp().join("secrets");
    std::fs::create_dir_all(&dir).unwrap();
    let amqp_file = dir.join("amqp-url");
    let redis_file = dir.join("redis-url");
    std::fs::write(&amqp_file, with_login(&amqp_url(), &user, &password)).unwrap();
    std::fs::write(&redis_file, with_login(&redis_url(), &user, &password)).unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http = format!("127.0.0.1:{port}");
    let log = dir.join("worker.log");
    let mut worker = spawn_worker_process(
        &fleet,
        &[
            ("PLEURA_AMQP_URL_FILE", amqp_file.to_str().unwrap()),
            ("PLEURA_REDIS_URL_FILE", redis_file.to_str().unwrap()),
            ("PLEURA_HTTP_ADDR", &http),
            ("PLEURA_LOG_LEVEL", "debug"),
            ("PLEURA_HEARTBEAT_INTERVAL_SECS", "1"),
        ],
        &log,
    );
    let addr: std::net::SocketAddr = http.parse().unwrap();
    wait_ready(addr).await;

    let (_conn, publisher) = fleet.publisher().await;
    let good = format!("good-{}", uuid::Uuid::new_v4().simple());
    let poison = format!("poison-{}", uuid::Uuid::new_v4().simple());
    fleet
        .submit(&publisher, &good, &phantoms(1, 256)[0], Priority::Routine)
        .await;
    fleet
        .submit(&publisher, &poison, b"not an image", Priority::Routine)
        .await;
    let results = fleet
        .wait_results(&[good.clone(), poison.clone()], Duration::from_secs(120))
        .await;
    let status = |id: &str| results.iter().find(|r| r.job_id == id).unwrap().status;
    assert_eq!(status(&good), Status::Ok);
    assert_eq!(status(&poison), Status::Error);

    let heartbeat = format!("{ns}:worker:");
    wait_until("a heartbeat", Duration::from_secs(30), || {
        let client = client.clone();
        let heartbeat = heartbeat.clone();
        async move {
            let mut con = client.get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{heartbeat}*"))
                .query_async(&mut con)
                .await
                .unwrap();
            !keys.is_empty()
        }
    })
    .await;
    let (code, metrics) = http_get(addr, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("pleura_jobs_total"), "{metrics}");
    let stored = redis_dump(&mut con, &ns).await;
    assert!(
        stored.contains(&good) && stored.contains(&heartbeat),
        "{stored}"
    );

    // A CLI run with the right login, and one the broker and Redis refuse.
    let good_cli = fleet
        .cli(
            ["fleet", "status", "--json"],
            &[
                ("PLEURA_AMQP_URL_FILE", amqp_file.to_str().unwrap()),
                ("PLEURA_REDIS_URL_FILE", redis_file.to_str().unwrap()),
            ],
        )
        .await
        .expect_ok();
    let wrong = format!("{password}x");
    let bad_redis = dir.join("bad-redis-url");
    std::fs::write(&bad_redis, with_login(&redis_url(), &user, &wrong)).unwrap();
    let refused = fleet
        .cli(
            ["fleet", "status"],
            &[("PLEURA_REDIS_URL_FILE", bad_redis.to_str().unwrap())],
        )
        .await;
    assert_ne!(
        refused.code,
        Some(0),
        "a wrong password must fail: {refused:?}"
    );
    assert!(!refused.stderr.is_empty(), "the refusal is explained");

    worker.start_kill().expect("stop the worker");
    let _ = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("DEBUG") || log_text.contains("debug"),
        "debug log: {log_text}"
    );

    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut con)
        .await
        .expect("ACL DELUSER");

    for (what, text) in [
        ("the worker's log", log_text.as_str()),
        ("/metrics", metrics.as_str()),
        ("Redis", stored.as_str()),
        (
            "pleura fleet status",
            &format!("{}{}", good_cli.stdout, good_cli.stderr),
        ),
        (
            "a refused login",
            &format!("{}{}", refused.stdout, refused.stderr),
        ),
    ] {
        assert!(
            !text.contains(&password[2..]),
            "the password appears in {what}:\n{text}"
        );
    }
}
