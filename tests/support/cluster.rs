//! Private Redis Clusters on 127.0.0.1: N masters, optionally with
//! replicas, optionally TLS; every node a [`RedisServer`] stopped by pid.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use super::process::{free_port, fresh_temp_dir};
use super::server::{Launch, Program, RedisServer};
use super::tls::{self, TlsFiles};
use super::{redis_cli, wait_for, NO_REDIS_CLI_MESSAGE};

/// A private Redis Cluster on 127.0.0.1: N masters (each with R replicas),
/// all 16384 slots assigned, `cluster_state:ok` on every node and every
/// replica in sync. Each node is a [`RedisServer`] (killed by pid on drop)
/// with its cluster bus on a second free port (`--cluster-port`, so the
/// default port + 10000 never matters) and its `nodes.conf` in its own temp
/// dir.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// For a TLS cluster: the certificates every node shares, in their own
    /// temp dir (removed on drop).
    tls: Option<(PathBuf, TlsFiles)>,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        if let Some((dir, _)) = &self.tls {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// What [`RedisCluster::builder`] starts.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    masters: usize,
    replicas: usize,
    tls: bool,
}

impl ClusterBuilder {
    /// `per_master` replicas for every master (`--cluster-replicas`).
    pub fn replicas(mut self, per_master: usize) -> ClusterBuilder {
        self.replicas = per_master;
        self
    }

    /// Every node speaks TLS only (clients and the cluster bus,
    /// `--tls-cluster yes`), all with one server certificate for 127.0.0.1
    /// from one throwaway CA ([`RedisCluster::tls_files`]). The bus always
    /// verifies the connecting node, so the nodes also share a client
    /// certificate of that CA (`--tls-client-cert-file`).
    pub fn tls(mut self) -> ClusterBuilder {
        self.tls = true;
        self
    }

    /// Starts the nodes, creates the cluster with `redis-cli --cluster
    /// create ... --cluster-yes` and waits until it is whole.
    pub fn start(self) -> RedisCluster {
        assert!(
            self.masters >= 3,
            "a Redis Cluster needs at least 3 masters"
        );
        let tls = self.tls.then(|| {
            let dir = fresh_temp_dir();
            let files = tls::generate_tls_certs(&dir);
            tls::generate_client_cert(&dir, &files);
            (dir, files)
        });
        let total = self.masters * (1 + self.replicas);
        let mut cluster = RedisCluster {
            nodes: Vec::with_capacity(total),
            tls,
        };
        for _ in 0..total {
            let node = cluster.start_node();
            cluster.nodes.push(node);
        }
        cluster.create(self.replicas);
        cluster.wait_until_whole(self.masters);
        cluster
    }
}

impl RedisCluster {
    /// A cluster of `masters` (at least 3) masters; see [`ClusterBuilder`].
    pub fn builder(masters: usize) -> ClusterBuilder {
        ClusterBuilder {
            masters,
            replicas: 0,
            tls: false,
        }
    }

    /// `masters` masters, no replicas.
    pub fn start(masters: usize) -> RedisCluster {
        Self::builder(masters).start()
    }

    /// `masters` masters, no replicas, TLS only ([`ClusterBuilder::tls`]).
    pub fn start_tls(masters: usize) -> RedisCluster {
        Self::builder(masters).tls().start()
    }

    fn start_node(&self) -> RedisServer {
        let bus = free_port()
            .expect("a free port for the cluster bus")
            .to_string();
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-port",
            &bus,
            "--cluster-node-timeout",
            "5000",
        ];
        let Some((dir, files)) = &self.tls else {
            return RedisServer::start_with(&args);
        };
        let client_cert = dir.join("client.crt").display().to_string();
        let client_key = dir.join("client.key").display().to_string();
        args.extend(["--tls-cluster", "yes", "--tls-client-cert-file"]);
        args.push(&client_cert);
        args.push("--tls-client-key-file");
        args.push(&client_key);
        RedisServer::start_in(
            fresh_temp_dir(),
            Launch::new(Program::Redis, &args, Some(files.clone())),
        )
    }

    /// `redis-cli --cluster create`. It waits for the nodes to join for as
    /// long as it takes (for ever, if they cannot talk), so it gets a
    /// deadline; its output goes to a file in the first node's dir, for the
    /// failure message.
    fn create(&self, replicas: usize) {
        let log_path = self.nodes[0].dir().join("cluster-create.log");
        let log = File::create(&log_path).expect("creating cluster-create.log");
        let mut create = Command::new("redis-cli")
            .args(self.cli_tls_args())
            .args(["--cluster", "create"])
            .args(self.endpoints())
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("running redis-cli: {e}\n{NO_REDIS_CLI_MESSAGE}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            match create.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = create.kill();
                    let _ = create.wait();
                    break None;
                }
            }
        };
        assert!(
            status.is_some_and(|s| s.success()),
            "redis-cli --cluster create failed ({status:?}; None: still waiting after 60 s):\n{}\nnode logs:\n{}",
            fs::read_to_string(&log_path).unwrap_or_default(),
            self.nodes
                .iter()
                .map(|n| format!("--- {}:\n{}", n.port(), n.log()))
                .collect::<String>()
        );
    }

    /// Waits until every node sees the cluster ok with every slot assigned
    /// and every node known, the nodes agree on which of `masters` masters
    /// owns what, and every replica is in sync with its master.
    fn wait_until_whole(&self, masters: usize) {
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        for port in self.ports() {
            self.wait_for_reply("ready", port, &["CLUSTER", "INFO"], |info| {
                info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_assigned:16384")
                    && info.contains(&known)
            });
        }
        self.wait_until_agreed(|map| map.len() == masters);
        for port in self.ports() {
            self.wait_for_reply("in sync", port, &["INFO", "replication"], |info| {
                info.contains("role:master")
                    || (info.contains("master_link_status:up")
                        && info.contains("master_sync_in_progress:0"))
            });
        }
    }

    /// Waits up to 30 s until node `port`'s reply to `args` passes `ok`.
    fn wait_for_reply(&self, what: &str, port: u16, args: &[&str], ok: impl Fn(&str) -> bool) {
        wait_for(
            &format!("cluster node {port} {what}"),
            Duration::from_secs(30),
            || {
                let reply = self.cli(port, args);
                if ok(&reply) {
                    Ok(())
                } else {
                    Err(reply)
                }
            },
        );
    }

    /// Waits until every node sees the same slot map, and `check` holds for it.
    fn wait_until_agreed(&self, check: impl Fn(&[(u16, u16, u16)]) -> bool) {
        wait_for(
            "the nodes agree on the slots",
            Duration::from_secs(30),
            || self.agreed(&check),
        );
    }

    /// Whether every node sees the same slot map, and `check` holds for it
    /// (else the maps, for a failure message).
    fn agreed(&self, check: &impl Fn(&[(u16, u16, u16)]) -> bool) -> Result<(), String> {
        let maps: Vec<Vec<(u16, u16, u16)>> = self
            .ports()
            .iter()
            .map(|&p| self.slot_ranges_seen_by(p))
            .collect();
        if maps.iter().all(|m| m == &maps[0]) && check(&maps[0]) {
            Ok(())
        } else {
            Err(format!("{maps:?}"))
        }
    }

    /// The shared certificates of a TLS cluster.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref().map(|(_, files)| files)
    }

    /// [`redis_cli`] for node `port`, over TLS for a TLS cluster.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let mut all: Vec<String> = self.cli_tls_args();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        redis_cli(port, &all)
    }

    /// `--tls --cacert <ca>` for a TLS cluster, else nothing.
    fn cli_tls_args(&self) -> Vec<String> {
        match &self.tls {
            Some((_, files)) => vec![
                "--tls".into(),
                "--cacert".into(),
                files.ca_cert.display().to_string(),
            ],
            None => Vec::new(),
        }
    }

    /// The nodes' ports (masters and replicas).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// `127.0.0.1:<port>` of every node.
    pub fn endpoints(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// `redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,...` (`rediss+cluster`
    /// for a TLS cluster).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss+cluster"
        } else {
            "redis+cluster"
        };
        format!("{scheme}://{}", self.endpoints().join(","))
    }

    /// The nodes themselves (for logs, pids, faults).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// `CLUSTER KEYSLOT <key>`.
    pub fn keyslot(&self, key: &str) -> u16 {
        let out = self.cli(self.nodes[0].port(), &["CLUSTER", "KEYSLOT", key]);
        out.parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key:?} answered {out:?}"))
    }

    /// The port of the master serving `slot`.
    pub fn port_for_slot(&self, slot: u16) -> u16 {
        self.slot_ranges_seen_by(self.nodes[0].port())
            .into_iter()
            .find(|&(from, to, _)| (from..=to).contains(&slot))
            .map(|(_, _, port)| port)
            .unwrap_or_else(|| panic!("no node serves slot {slot}"))
    }

    /// The port of the master holding `key`.
    pub fn port_for_key(&self, key: &str) -> u16 {
        self.port_for_slot(self.keyslot(key))
    }

    /// The ports of the replicas of the master on `master_port`, once every
    /// node agrees on them and each is in sync with it (so one can take
    /// over); waits up to 30 s for that (after a failover, for instance).
    pub fn replicas_of(&self, master_port: u16) -> Vec<u16> {
        let mut agreed = Vec::new();
        wait_for(
            &format!("the nodes agree on the replicas of {master_port}"),
            Duration::from_secs(30),
            || {
                let seen: Vec<Vec<u16>> = self
                    .ports()
                    .into_iter()
                    .map(|p| self.replicas_seen_by(p, master_port))
                    .collect();
                if seen[0].is_empty() || seen.iter().any(|s| s != &seen[0]) {
                    return Err(format!("replicas per node: {seen:?}"));
                }
                agreed.clone_from(&seen[0]);
                Ok(())
            },
        );
        for &replica in &agreed {
            self.wait_for_reply(
                &format!("following {master_port}"),
                replica,
                &["INFO", "replication"],
                |info| {
                    info.contains(&format!("master_port:{master_port}"))
                        && info.contains("master_link_status:up")
                        && info.contains("master_sync_in_progress:0")
                },
            );
        }
        agreed
    }

    fn replicas_seen_by(&self, port: u16, master_port: u16) -> Vec<u16> {
        let nodes = self.nodes_seen_by(port);
        let Some(master_id) = nodes
            .iter()
            .find(|n| n.port == master_port)
            .map(|n| n.id.clone())
        else {
            panic!("no node on port {master_port}: {nodes:?}")
        };
        nodes
            .iter()
            .filter(|n| n.flags.contains("slave") && n.master == master_id)
            .map(|n| n.port)
            .collect()
    }

    /// `CLUSTER FAILOVER` on the replica `replica_port` (a manual failover:
    /// its master stops writes, the replica catches up and takes over), then
    /// waits until every node agrees that the replica serves its master's
    /// slots; the old master then becomes its replica ([`Self::replicas_of`]
    /// waits for that). A manual failover that does not happen within 10 s
    /// (Redis gives up on one after 5 s) is asked for again, up to 3 times in
    /// all.
    pub fn failover(&self, replica_port: u16) {
        let old_master = self
            .ports()
            .into_iter()
            .find(|&p| {
                self.replicas_seen_by(replica_port, p)
                    .contains(&replica_port)
            })
            .unwrap_or_else(|| panic!("{replica_port} is no replica"));
        let taken_over = |map: &[(u16, u16, u16)]| {
            map.iter().any(|&(_, _, port)| port == replica_port)
                && map.iter().all(|&(_, _, port)| port != old_master)
        };
        let mut last = String::new();
        let done = (1..=3).any(|_| {
            let reply = self.cli(replica_port, &["CLUSTER", "FAILOVER"]);
            assert_eq!(reply, "OK", "CLUSTER FAILOVER on {replica_port}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match self.agreed(&taken_over) {
                    Ok(()) => return true,
                    Err(maps) => last = maps,
                }
                thread::sleep(Duration::from_millis(50));
            }
            false
        });
        let node = |port: u16| self.nodes.iter().find(|n| n.port() == port);
        assert!(
            done,
            "{replica_port} did not take over from {old_master} after 3 CLUSTER FAILOVERs; slot maps:\n{last}\nreplica log:\n{}\nmaster log:\n{}",
            node(replica_port).map(RedisServer::log).unwrap_or_default(),
            node(old_master).map(RedisServer::log).unwrap_or_default()
        );
    }

    /// `(first slot, last slot, master port)` per range, sorted, as node
    /// `port` sees them.
    fn slot_ranges_seen_by(&self, port: u16) -> Vec<(u16, u16, u16)> {
        let mut ranges = Vec::new();
        for node in self.nodes_seen_by(port) {
            if !node.flags.contains("master") {
                continue;
            }
            for slots in &node.slots {
                // Migrating/importing markers look like `[5461->-<id>]`.
                if slots.starts_with('[') {
                    continue;
                }
                let (from, to) = slots.split_once('-').unwrap_or((slots, slots));
                if let (Ok(from), Ok(to)) = (from.parse(), to.parse()) {
                    ranges.push((from, to, node.port));
                }
            }
        }
        ranges.sort_unstable();
        ranges
    }

    /// `CLUSTER NODES` as node `port` sees it: one line per node,
    /// `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slots>...`.
    fn nodes_seen_by(&self, port: u16) -> Vec<NodeLine> {
        self.cli(port, &["CLUSTER", "NODES"])
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 8 {
                    return None;
                }
                let port = fields[1]
                    .split('@')
                    .next()
                    .and_then(|addr| addr.rsplit(':').next())
                    .and_then(|p| p.parse().ok())?;
                Some(NodeLine {
                    id: fields[0].to_owned(),
                    port,
                    flags: fields[2].to_owned(),
                    master: fields[3].to_owned(),
                    slots: fields[8..].iter().map(|s| (*s).to_owned()).collect(),
                })
            })
            .collect()
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    id: String,
    port: u16,
    /// `myself,master`, `slave`, `master,fail?`, ...
    flags: String,
    /// The master's id for a replica, `-` for a master.
    master: String,
    slots: Vec<String>,
}

/// A Redis Cluster shared by every test of this test binary (3 masters,
/// started on first use, killed by its watchdogs when the binary exits).
/// Tests sharing it must keep to their own keys ([`super::unique_prefix`]).
pub fn cluster_url() -> String {
    shared_cluster().url()
}

/// The cluster behind [`cluster_url`].
pub fn shared_cluster() -> &'static RedisCluster {
    static SHARED: OnceLock<RedisCluster> = OnceLock::new();
    // Never dropped (statics aren't): the nodes' watchdogs kill them once
    // this process is gone.
    SHARED.get_or_init(|| RedisCluster::start(3))
}
