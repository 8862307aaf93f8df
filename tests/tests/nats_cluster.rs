//! The harness's 3-node NATS JetStream cluster (what three berth managers share with `--store nats`)
//! is a real cluster: a bucket with 3 replicas keeps taking writes and answering reads through the
//! two servers left when one stops or crashes, and the server that comes back catches up.

use async_nats::jetstream::{self, kv};
use berth_e2e::{prefix, NatsCluster};
use std::time::{Duration, Instant};

/// How long the bucket may refuse writes after a server goes (its stream re-elects a leader when the
/// one that went was leading it): measured 4.5-8 s after a SIGKILL of the leader with nats-server
/// 2.9.10's defaults on a loaded 2-core machine.
const FAILOVER: Duration = Duration::from_secs(15);

/// Puts `value` under `key`, retrying until `FAILOVER`; returns how long it took.
async fn put_within(store: &kv::Store, key: &str, value: &str) -> Duration {
    let start = Instant::now();
    loop {
        match store.put(key, value.to_string().into()).await {
            Ok(_) => return start.elapsed(),
            Err(e) => assert!(
                start.elapsed() < FAILOVER,
                "e2e: writing {key} failed for {FAILOVER:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get(store: &kv::Store, key: &str) -> Option<String> {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("e2e: reading {key}: {e}"))
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

/// A KV bucket with `replicas` copies. Not `Context::create_key_value`: async-nats 0.51 first reads
/// the account info, whose 2.9 form lacks fields it requires (`reserved_memory`,
/// `reserved_storage`), and fails with "data did not match any variant of untagged enum Response".
/// The bucket is its backing stream, configured as that call would.
async fn create_bucket(js: &jetstream::Context, bucket: &str, replicas: usize) -> kv::Store {
    js.create_stream(jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        num_replicas: replicas,
        allow_direct: true,
        allow_rollup: true,
        deny_delete: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .expect("a bucket with 3 replicas needs the cluster formed");
    js.get_key_value(bucket).await.unwrap()
}

/// Waits until the bucket's stream has a leader and both other replicas are current.
async fn replicas_current(js: &jetstream::Context, bucket: &str) {
    let start = Instant::now();
    loop {
        let mut stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
        let cluster = stream.info().await.unwrap().cluster.clone();
        let current = cluster.as_ref().is_some_and(|c| {
            c.leader.is_some()
                && c.replicas.len() == NatsCluster::SIZE - 1
                && c.replicas.iter().all(|r| r.current && !r.offline)
        });
        if current {
            eprintln!("replicas current after {:?}", start.elapsed());
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "e2e: the bucket's replicas did not catch up: {cluster:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The server (its index) leading the bucket's stream.
async fn leader_of(js: &jetstream::Context, bucket: &str) -> usize {
    let mut stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
    let info = stream.info().await.unwrap();
    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
    (0..NatsCluster::SIZE)
        .find(|i| leader.as_deref() == Some(NatsCluster::name(*i).as_str()))
        .unwrap_or_else(|| panic!("e2e: no leader among the cluster's servers: {leader:?}"))
}

/// The server (its index) this client is connected to.
fn connected_to(client: &async_nats::Client) -> usize {
    let name = client.server_info().server_name;
    (0..NatsCluster::SIZE)
        .find(|i| NatsCluster::name(*i) == name)
        .unwrap_or_else(|| panic!("e2e: connected to an unknown server {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_bucket_survives_losing_any_one_server() {
    let mut cluster = NatsCluster::start();
    // async-nats takes several servers as a list, not as one comma-separated string.
    let urls: Vec<String> = cluster.urls().split(',').map(String::from).collect();
    let client = async_nats::connect(urls.as_slice()).await.unwrap();
    let js = jetstream::new(client.clone());
    let bucket = prefix("cluster").replace('-', "_");
    let store = create_bucket(&js, &bucket, 3).await;
    let mut info = store.status().await.unwrap().info;
    let cluster_info = info.cluster.take().expect("a clustered stream");
    assert_eq!(
        cluster_info.replicas.len(),
        2,
        "a leader and two replicas: {cluster_info:?}"
    );
    put_within(&store, "a", "1").await;

    // A clean stop of the server this client is connected to: the client moves to another, and
    // the bucket (2 of 3 replicas left, a quorum) still takes writes.
    let first = connected_to(&client);
    cluster.stop(first);
    let took = put_within(&store, "b", "2").await;
    eprintln!("write after stopping n{first}: {took:?}");
    assert_ne!(connected_to(&client), first);
    assert_eq!(get(&store, "a").await.as_deref(), Some("1"));
    assert_eq!(get(&store, "b").await.as_deref(), Some("2"));

    // Back with its store: it rejoins; then a crash (SIGKILL) of the bucket's leader, the worst
    // one to lose: the two left elect a new one before the write goes through.
    cluster.start_node(first);
    // Until it has caught up, the bucket has one current replica besides the leader: losing the
    // leader then would leave no quorum (writes fail with "no stream found" until it comes back).
    replicas_current(&js, &bucket).await;
    let second = leader_of(&js, &bucket).await;
    cluster.kill(second);
    let took = put_within(&store, "c", "3").await;
    eprintln!("write after killing the leader n{second}: {took:?}");
    assert_ne!(leader_of(&js, &bucket).await, second);
    for (k, v) in [("a", "1"), ("b", "2"), ("c", "3")] {
        assert_eq!(get(&store, k).await.as_deref(), Some(v), "key {k}");
    }
    cluster.start_node(second);

    // The server stopped first has every value, read through it alone.
    let only_first = async_nats::connect(cluster.url(first)).await.unwrap();
    let store_first = jetstream::new(only_first)
        .get_key_value(&bucket)
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        // A replica answers direct gets from its own copy once it has caught up.
        if get(&store_first, "c").await.as_deref() == Some("3") {
            break;
        }
        assert!(start.elapsed() < FAILOVER, "e2e: n{first} did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    js.delete_key_value(&bucket).await.unwrap();
}

/// berth's own bus connection takes the cluster as `--nats` gives it, one comma-separated string,
/// and reaches it even when the first server listed is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_connects_to_the_cluster_through_its_url_list() {
    let mut cluster = NatsCluster::start();
    cluster.stop(0);
    // berth's start fails at once while JetStream has no meta leader (n0 may have been it).
    cluster.wait_formed(Duration::from_secs(30));
    berth_controllers::bus::NatsBus::connect(&cluster.urls())
        .await
        .unwrap_or_else(|e| panic!("e2e: berth cannot connect to {}: {e}", cluster.urls()));
}
