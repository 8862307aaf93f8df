//! Unit tests of the Compose translation: no Docker, files read from a map.

use super::*;
use std::collections::HashMap;

/// Files the fake reader knows, by path relative to `/compose`.
fn reader(files: &[(&str, &str)]) -> impl Fn(&Path) -> std::io::Result<Vec<u8>> {
    let map: HashMap<PathBuf, Vec<u8>> = files
        .iter()
        .map(|(p, c)| (Path::new("/compose").join(p), c.as_bytes().to_vec()))
        .collect();
    move |p: &Path| {
        map.get(p)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

fn run(yaml: &str, files: &[(&str, &str)], prefix: Option<&str>) -> Result<Import, String> {
    let read = reader(files);
    let options = Options {
        prefix: prefix.map(str::to_string),
    };
    import("compose.yml", yaml, Path::new("/compose"), &read, &options).map_err(|errs| {
        errs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })
}

fn ok(yaml: &str) -> Import {
    run(yaml, &[], None).unwrap()
}

fn err(yaml: &str) -> String {
    run(yaml, &[], None).unwrap_err()
}

fn spec<'a>(i: &'a Import, kind: Kind, name: &str) -> &'a Value {
    &i.objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
        .unwrap_or_else(|| panic!("no {kind:?} {name} in {:?}", names(i)))
        .manifest["spec"]
}

fn names(i: &Import) -> Vec<String> {
    i.objects
        .iter()
        .map(|o| format!("{}/{}", o.kind.lower(), o.name))
        .collect()
}

fn warned<'a>(i: &'a Import, path: &str) -> &'a Finding {
    i.warnings
        .iter()
        .find(|w| w.path == path)
        .unwrap_or_else(|| panic!("no warning at {path}: {:#?}", i.warnings))
}

#[test]
fn entrypoint_is_command_and_command_is_args() {
    let i = ok("services:
  both:
    image: a
    entrypoint: /bin/app --serve
    command: [\"--port\", \"80\"]
  cmd:
    image: a
    command: npm run 'start prod'
  ep:
    image: a
    entrypoint: [\"/tini\", \"--\"]
  cleared:
    image: a
    entrypoint: []
    command: [\"python\", \"app.py\"]
");
    let s = spec(&i, Kind::Service, "both");
    assert_eq!(s["command"], json!(["/bin/app", "--serve"]));
    assert_eq!(s["args"], json!(["--port", "80"]));
    let s = spec(&i, Kind::Service, "cmd");
    assert_eq!(s.get("command"), None, "the image's entrypoint stays");
    assert_eq!(s["args"], json!(["npm", "run", "start prod"]));
    let s = spec(&i, Kind::Service, "ep");
    assert_eq!(s["command"], json!(["/tini", "--"]));
    assert_eq!(
        s.get("args"),
        None,
        "as in Docker, an entrypoint alone drops the image's CMD"
    );
    // An empty entrypoint clears the image's: the command is then the whole program.
    let s = spec(&i, Kind::Service, "cleared");
    assert_eq!(s["command"], json!(["python", "app.py"]));
    assert_eq!(s.get("args"), None);
    assert!(i.warnings.is_empty(), "{:?}", i.warnings);
}

#[test]
fn environment_list_and_map_are_the_same() {
    let list = ok("services:\n  a:\n    image: a\n    environment:\n      - PORT=8080\n      - DEBUG=true\n      - EMPTY=\n");
    let map = ok(
        "services:\n  a:\n    image: a\n    environment:\n      PORT: 8080\n      DEBUG: true\n      EMPTY: \"\"\n",
    );
    let sorted = |i: &Import| {
        let mut env = spec(i, Kind::Service, "a")["env"]
            .as_array()
            .unwrap()
            .clone();
        env.sort_by_key(|e| e["name"].as_str().unwrap().to_string());
        Value::Array(env)
    };
    let want = json!([
        {"name": "DEBUG", "value": "true"},
        {"name": "EMPTY", "value": ""},
        {"name": "PORT", "value": "8080"},
    ]);
    assert_eq!(sorted(&list), want);
    assert_eq!(sorted(&map), want);
    // A name without a value would come from the deployer's shell: not imported, warned.
    let i =
        ok("services:\n  a:\n    image: a\n    environment:\n      - FROM_SHELL\n      - SET=1\n");
    assert_eq!(
        spec(&i, Kind::Service, "a")["env"],
        json!([{"name": "SET", "value": "1"}])
    );
    let w = warned(&i, "services.a.environment[0]");
    assert!(w.message.contains("FROM_SHELL has no value"), "{w}");
    assert_eq!(w.location.line, 5);
}

#[test]
fn env_file_is_read_relative_and_environment_wins() {
    let yaml = "services:
  a:
    image: a
    env_file: [common.env, ./a.env]
    environment:
      LEVEL: debug
";
    let files = [
        ("common.env", "LEVEL=info\nREGION=eu\n"),
        ("a.env", "# comment\nREGION=us\nexport DB_PASSWORD=\"hunter2\"\nDB_PASSWORD_FILE=/run/secrets/db\n"),
    ];
    let i = run(yaml, &files, None).unwrap();
    assert_eq!(
        spec(&i, Kind::Service, "a")["env"],
        json!([
            {"name": "LEVEL", "value": "debug"},
            {"name": "REGION", "value": "us"},
            {"name": "DB_PASSWORD", "value": "hunter2"},
            {"name": "DB_PASSWORD_FILE", "value": "/run/secrets/db"},
        ])
    );
    // The credential-looking name is warned about (file and line named), its value never shown;
    // a *_FILE name is the recommended way and is not.
    let secret_warnings: Vec<&Finding> = i
        .warnings
        .iter()
        .filter(|w| w.message.contains("looks like a credential"))
        .collect();
    assert_eq!(secret_warnings.len(), 1, "{:#?}", i.warnings);
    let w = secret_warnings[0];
    assert_eq!(w.path, "services.a.env_file[1]");
    assert!(
        w.message
            .starts_with("/compose/a.env:3: DB_PASSWORD looks like"),
        "{w}"
    );
    let all = format!("{:?}{:?}", i.warnings, i.notes);
    assert!(!all.contains("hunter2"), "a value leaked: {all}");

    // A missing file is an error naming it and the key's line; an optional one is a note.
    let e = run(yaml, &files[..1], None).unwrap_err();
    assert!(
        e.starts_with("compose.yml:4:28: services.a.env_file[1]: cannot read /compose/a.env"),
        "{e}"
    );
    let i = run(
        "services:\n  a:\n    image: a\n    env_file:\n      - path: local.env\n        required: false\n",
        &[],
        None,
    )
    .unwrap();
    assert!(i.notes.iter().any(|n| n.message.contains("is optional")));
    // A malformed line is an error naming file and line, never its text.
    let e = run(yaml, &[files[0], ("a.env", "TOKEN=\"hunter2\n")], None).unwrap_err();
    assert!(
        e.contains("/compose/a.env:1: has an unterminated double quote"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
}

#[test]
fn credential_names() {
    for n in [
        "DB_PASSWORD",
        "API_KEY",
        "GITHUB_TOKEN",
        "SECRET_KEY_BASE",
        "aws_secret_access_key",
        "MYSQLPASSWORD",
    ] {
        assert!(looks_secret(n), "{n}");
    }
    for n in [
        "PORT",
        "KEYCLOAK_URL",
        "DB_PASSWORD_FILE",
        "TLS_KEY_PATH",
        "MONKEY",
    ] {
        assert!(!looks_secret(n), "{n}");
    }
}

#[test]
fn deploy_fields_map_one_to_one() {
    let i = ok("services:
  api:
    image: registry.example.com/api:1.2
    labels: [com.example.tier=backend]
    stop_grace_period: 20s
    deploy:
      replicas: 3
      labels:
        com.example.team: payments
      resources:
        limits: {cpus: '1.5', memory: 512M}
        reservations: {cpus: 0.25, memory: 128M}
      update_config:
        parallelism: 2
        delay: 10s
        failure_action: rollback
        monitor: 30s
        max_failure_ratio: 0.1
        order: start-first
      rollback_config:
        parallelism: 0
        failure_action: pause
      restart_policy:
        condition: on-failure
        delay: 5s
        max_attempts: 3
        window: 2m
      placement:
        constraints: [node.role == worker]
        preferences:
          - spread: node.labels.zone
        max_replicas_per_node: 2
  agent:
    image: a
    deploy: {mode: global}
");
    let s = spec(&i, Kind::Service, "api");
    assert_eq!(s["replicas"], 3);
    assert_eq!(s["labels"], json!({"com.example.team": "payments"}));
    assert_eq!(s["containerLabels"], json!({"com.example.tier": "backend"}));
    assert_eq!(s["stopGracePeriod"], "20s");
    assert_eq!(
        s["resources"],
        json!({"limits": {"cpus": "1.5", "memory": "512M"},
               "reservations": {"cpus": "0.25", "memory": "128M"}})
    );
    assert_eq!(
        s["update"],
        json!({"parallelism": 2, "delay": "10s", "failureAction": "rollback",
               "monitor": "30s", "maxFailureRatio": 0.1, "order": "start-first"})
    );
    assert_eq!(
        s["rollback"],
        json!({"parallelism": 0, "failureAction": "pause"})
    );
    assert_eq!(
        s["restart"],
        json!({"condition": "on-failure", "delay": "5s", "maxAttempts": 3, "window": "2m"})
    );
    assert_eq!(
        s["placement"],
        json!({"constraints": ["node.role == worker"], "spread": ["node.labels.zone"],
               "maxReplicasPerNode": 2})
    );
    let a = spec(&i, Kind::Service, "agent");
    assert_eq!(a["mode"], "global");
    assert_eq!(a.get("replicas"), None);
    assert!(i.warnings.is_empty(), "{:#?}", i.warnings);
    // What the server refuses is refused here, at the Compose key.
    let e = err("services:\n  a:\n    image: a\n    deploy:\n      resources:\n        limits: {memory: 1M}\n");
    assert!(
        e.starts_with("compose.yml:2:3: services.a: would make an invalid berth object: spec.resources.limits.memory: 1M is below"),
        "{e}"
    );
    let e = err("services:\n  a:\n    image: a\n    deploy:\n      update_config:\n        order: sideways\n");
    assert!(
        e.starts_with(
            "compose.yml:6:9: services.a.deploy.update_config.order: `sideways` is not an order"
        ),
        "{e}"
    );
}

#[test]
fn healthcheck_durations_and_forms() {
    let i = ok("services:
  a:
    image: a
    healthcheck:
      test: curl -f http://localhost/ || exit 1
      interval: 1m30s
      timeout: 500ms
      retries: 3
      start_period: 40s
  b:
    image: a
    healthcheck:
      test: [\"CMD\", \"pg_isready\"]
  c:
    image: a
    healthcheck:
      disable: true
");
    assert_eq!(
        spec(&i, Kind::Service, "a")["healthcheck"],
        json!({"test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"],
               "interval": "1m30s", "timeout": "500ms", "retries": 3, "startPeriod": "40s"})
    );
    assert_eq!(
        spec(&i, Kind::Service, "b")["healthcheck"]["test"],
        json!(["CMD", "pg_isready"])
    );
    assert_eq!(
        spec(&i, Kind::Service, "c")["healthcheck"],
        json!({"disable": true})
    );
    let e = err("services:\n  a:\n    image: a\n    healthcheck:\n      interval: soon\n");
    assert!(
        e.starts_with("compose.yml:5:7: services.a.healthcheck.interval: invalid duration `soon`"),
        "{e}"
    );
}

#[test]
fn secrets_are_never_read_and_configs_are() {
    let yaml = "services:
  web:
    image: a
    secrets:
      - db_password
      - source: api_key
        target: /etc/app/key
        uid: '1000'
        mode: 0o400
      - vault_token
    configs:
      - nginx_conf
      - source: motd
        target: /etc/motd
configs:
  nginx_conf:
    file: ./nginx.conf
  motd:
    content: hello
secrets:
  db_password:
    file: ./secrets/db.txt
  api_key:
    file: key.txt
  vault_token:
    external: true
    name: vault-token
";
    let files = [
        ("nginx.conf", "server {}\n"),
        ("secrets/db.txt", "hunter2"),
        ("key.txt", "hunter3"),
    ];
    let i = run(yaml, &files, Some("shop")).unwrap();
    assert_eq!(
        names(&i),
        [
            "config/shop-motd",
            "config/shop-nginx-conf",
            "service/shop-web"
        ]
    );
    let s = spec(&i, Kind::Service, "shop-web");
    assert_eq!(
        s["secrets"],
        json!([
            {"name": "shop-db-password", "key": "db_password", "target": "db_password"},
            {"name": "shop-api-key", "key": "api_key", "target": "/etc/app/key", "uid": "1000", "mode": "0400"},
            {"name": "vault-token", "target": "vault_token"},
        ])
    );
    assert_eq!(
        s["configs"],
        json!([
            {"name": "shop-nginx-conf", "key": "nginx_conf", "target": "/nginx_conf"},
            {"name": "shop-motd", "key": "motd", "target": "/etc/motd"},
        ])
    );
    assert_eq!(
        spec(&i, Kind::Config, "shop-nginx-conf"),
        &json!({"stringData": {"nginx_conf": "server {}\n"}})
    );
    assert_eq!(
        spec(&i, Kind::Config, "shop-motd"),
        &json!({"stringData": {"motd": "hello"}})
    );
    // No Secret object; the note says how to create it from its file; no value anywhere.
    let note = i
        .notes
        .iter()
        .find(|n| n.path == "secrets.db_password" && n.message.contains("berth create"))
        .expect("a note for the secret");
    assert!(
        note.message.ends_with(
            "berth create secret shop-db-password --from-file db_password=/compose/secrets/db.txt"
        ),
        "{note}"
    );
    let ext = i
        .notes
        .iter()
        .find(|n| n.path == "secrets.vault_token" && n.message.contains("external"))
        .expect("a note for the external secret");
    assert!(ext.message.contains("not created"), "{ext}");
    let everything = format!(
        "{:?}{:?}{}",
        i.notes,
        i.warnings,
        run::stream(&i, "compose.yml")
    );
    assert!(
        !everything.contains("hunter"),
        "a secret leaked: {everything}"
    );
    // Undefined references are errors, as in Compose.
    let e = err("services:\n  a:\n    image: a\n    secrets: [nope]\n");
    assert!(
        e.starts_with("compose.yml:4:15: services.a.secrets[0]: `nope` is not defined"),
        "{e}"
    );
    let e = run(
        "configs:\n  c:\n    file: missing.conf\nservices: {}\n",
        &[],
        None,
    )
    .unwrap_err();
    assert!(
        e.contains("configs.c.file: cannot read /compose/missing.conf"),
        "{e}"
    );
}

#[test]
fn volumes_named_anonymous_tmpfs_and_bind() {
    let i = ok("services:
  db:
    image: a
    volumes:
      - pgdata:/var/lib/postgresql/data
      - pgdata:/backup:ro
      - /scratch
      - ./conf:/etc/conf:ro
      - type: tmpfs
        target: /run
        tmpfs: {size: 64M}
    tmpfs: /tmp:size=16M
volumes:
  pgdata:
    driver_opts: {type: nfs, o: 'addr=10.0.0.1,rw', device: ':/exports/pg'}
  hostdir:
    driver_opts: {type: none, o: bind, device: /srv/data}
");
    assert_eq!(
        spec(&i, Kind::Service, "db")["volumes"],
        json!([
            {"target": "/var/lib/postgresql/data", "volume": "pgdata"},
            {"target": "/backup", "volume": "pgdata", "readOnly": true},
            {"target": "/scratch"},
            {"target": "/run", "tmpfs": true, "size": "64M"},
            {"target": "/tmp", "tmpfs": true, "size": "16M"},
        ])
    );
    assert_eq!(
        spec(&i, Kind::Volume, "pgdata")["driverOpts"]["type"],
        "nfs"
    );
    let w = warned(&i, "services.db.volumes[3]");
    assert!(w.message.contains("`./conf` is a host path"), "{w}");
    // A volume that bind-mounts a host path is refused by a default server: not emitted, warned.
    assert!(!names(&i).contains(&"volume/hostdir".to_string()));
    let w = warned(&i, "volumes.hostdir");
    assert!(w.message.contains("--allow-bind-mounts"), "{w}");
    assert!(i
        .notes
        .iter()
        .any(|n| n.path == "services.db.volumes[2]" && n.message.contains("anonymous volume")));
    let e = err("services:\n  a:\n    image: a\n    volumes: [data:/d]\n");
    assert!(
        e.contains("services.a.volumes[0]: `data` is not defined"),
        "{e}"
    );
}

#[test]
fn networks_list_map_external_and_default() {
    let i = ok("services:
  web:
    image: a
    networks:
      front:
        aliases: [www]
      back:
  db:
    image: a
    networks: [back, default]
  lonely:
    image: a
networks:
  front:
    attachable: true
    labels: [tier=front]
  back:
    driver: overlay
    internal: true
    driver_opts: {encrypted: ''}
  shared:
    external: true
    name: corp-net
");
    assert_eq!(
        names(&i),
        [
            "network/back",
            "network/front",
            "service/db",
            "service/lonely",
            "service/web"
        ]
    );
    assert_eq!(
        spec(&i, Kind::Network, "front"),
        &json!({"attachable": true, "labels": {"tier": "front"}})
    );
    assert_eq!(
        spec(&i, Kind::Network, "back"),
        &json!({"encrypted": true, "internal": true})
    );
    assert_eq!(
        spec(&i, Kind::Service, "web")["networks"],
        json!(["back", "front"])
    );
    assert_eq!(spec(&i, Kind::Service, "db")["networks"], json!(["back"]));
    assert_eq!(spec(&i, Kind::Service, "lonely").get("networks"), None);
    warned(&i, "services.web.networks.front.aliases");
    warned(&i, "services.db.networks[1]");
    assert!(i
        .notes
        .iter()
        .any(|n| n.path == "networks.shared" && n.message.contains("`corp-net`")));
    let e = err("services:\n  a:\n    image: a\n    networks: [nowhere]\n");
    assert!(
        e.contains("services.a.networks[0]: `nowhere` is not defined"),
        "{e}"
    );
}

/// Every key without a berth equivalent is a warning at its own path and line; `x-` keys are
/// Compose's own "ignore me" and are not.
#[test]
fn every_unsupported_key_warns() {
    let yaml = "version: '3.8'
frobnicate: 1
x-common: &common {a: 1}
services:
  web:
    image: a
    x-note: fine
    build: .
    depends_on: [db]
    cap_add: [NET_ADMIN]
    cap_drop: [ALL]
    privileged: true
    network_mode: host
    pid: host
    ipc: host
    devices: ['/dev/fuse:/dev/fuse']
    container_name: web1
    security_opt: [no-new-privileges]
    sysctls: {net.core.somaxconn: 1024}
    ulimits: {nofile: 65535}
    extra_hosts: ['db:10.0.0.2']
    restart: always
    logging: {driver: syslog}
    mem_limit: 1g
    expose: [8080]
    links: [db]
    read_only: true
    wibble: true
    deploy:
      endpoint_mode: dnsrr
      resources:
        limits: {pids: 100}
    healthcheck:
      test: [CMD, 'true']
      start_interval: 1s
  db:
    image: a
    deploy:
      mode: replicated-job
";
    let i = ok(yaml);
    let lines: Vec<&str> = yaml.lines().collect();
    for path in [
        "frobnicate",
        "services.web.build",
        "services.web.depends_on",
        "services.web.cap_add",
        "services.web.cap_drop",
        "services.web.privileged",
        "services.web.network_mode",
        "services.web.pid",
        "services.web.ipc",
        "services.web.devices",
        "services.web.container_name",
        "services.web.security_opt",
        "services.web.sysctls",
        "services.web.ulimits",
        "services.web.extra_hosts",
        "services.web.restart",
        "services.web.logging",
        "services.web.mem_limit",
        "services.web.expose",
        "services.web.links",
        "services.web.read_only",
        "services.web.wibble",
        "services.web.deploy.endpoint_mode",
        "services.web.deploy.resources.limits.pids",
        "services.web.healthcheck.start_interval",
        "services.db.deploy.mode",
    ] {
        let w = warned(&i, path);
        let key = path.rsplit('.').next().unwrap();
        assert!(
            lines[w.location.line - 1].contains(&format!("{key}:")),
            "{path} placed at line {}: {w}",
            w.location.line
        );
        assert!(w.message.starts_with("not imported: "), "{w}");
    }
    assert!(warned(&i, "services.web.depends_on")
        .message
        .contains("retry"));
    assert!(warned(&i, "services.web.wibble")
        .message
        .contains("no berth equivalent"));
    assert!(
        !i.warnings.iter().any(|w| w.path.contains("x-")),
        "{:#?}",
        i.warnings
    );
    assert!(!i.warnings.iter().any(|w| w.path == "version"));
    // The job is skipped, the rest imported.
    assert_eq!(names(&i), ["service/web"]);
    let w = warned(&i, "services.web.deploy.endpoint_mode");
    assert_eq!(
        w.to_string(),
        format!(
            "compose.yml:30:7: services.web.deploy.endpoint_mode: {}",
            w.message
        )
    );
}

#[test]
fn published_ports_warn_and_web_ones_get_an_ingress_stub() {
    let i = ok("services:
  web:
    image: a
    ports:
      - '8080:80'
      - target: 8443
        published: 443
  db:
    image: a
    ports: ['127.0.0.1:5432:5432/tcp']
");
    assert_eq!(
        i.ingress_stubs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["web", "web-8443"]
    );
    for p in ["services.web.ports[0]", "services.web.ports[1]"] {
        assert!(warned(&i, p).message.contains("Ingress stub"), "{p}");
    }
    let w = warned(&i, "services.db.ports[0]");
    assert!(
        w.message.contains("`5432:5432`") && !w.message.contains("Ingress stub"),
        "{w}"
    );
    // The stub is all comments (applying it does nothing) and, uncommented with a host filled
    // in, an Ingress the server accepts.
    let stub = &i.ingress_stubs[0].text;
    assert!(stub.lines().all(|l| l.starts_with('#')), "{stub}");
    let uncommented: String = stub
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            !l.starts_with("Ingress for") && !l.starts_with("leading") && !l.starts_with("for a")
        })
        .map(|l| {
            format!(
                "{}\n",
                l.replace("CHANGE-ME.example.com", "shop.example.com")
            )
        })
        .collect();
    let docs = berth_api_types::manifest::parse_str("stub.yaml", &uncommented).unwrap();
    let obj = berth_api_types::typed::decode_doc(&docs[0]).unwrap();
    assert_eq!(obj.kind, Kind::Ingress);
    assert_eq!(
        obj.spec["rules"][0]["paths"][0],
        json!({"path": "/", "service": "web", "port": 80})
    );
    assert_eq!(
        parse_port("9090-9091:8080-8081/udp"),
        (Some(9090), Some(8080))
    );
    assert_eq!(parse_port("3000"), (None, Some(3000)));
}

#[test]
fn bad_yaml_and_wrong_types_name_file_line_and_key() {
    let e = err("services:\n  web:\n    image: [unclosed\n");
    assert!(e.starts_with("compose.yml:"), "{e}");
    assert!(
        e.contains(":4:") || e.contains(":3:"),
        "names the line: {e}"
    );
    let e = err("services:\n  web:\n    image: a\n    deploy:\n      replicas: three\n");
    assert_eq!(
        e,
        "compose.yml:5:7: services.web.deploy.replicas: must be a whole number of 0 or more, found \"three\""
    );
    let e = err("services:\n  web:\n    image: [a]\n");
    assert_eq!(
        e,
        "compose.yml:3:5: services.web.image: must be a string, found a list"
    );
    let e = err("services:\n  web:\n    build: .\n");
    assert!(e.contains("services.web: has only `build:`"), "{e}");
    let e = err("services:\n  web:\n    image: a\n    image: b\n");
    assert!(
        e.starts_with("compose.yml:4:"),
        "a duplicate key is refused: {e}"
    );
    // YAML 1.1's octal without `0o` is ambiguous: refused with the fix, at its line.
    let e = err("secrets:\n  s:\n    file: x\nservices:\n  a:\n    image: a\n    secrets:\n      - source: s\n        mode: 0440\n");
    assert!(
        e.starts_with("compose.yml:9:") && e.contains("write `0o`"),
        "{e}"
    );
    assert!(err("").contains("is empty"));
}

#[test]
fn names_become_dns_labels_and_variables_are_flagged() {
    let i = run(
        "services:\n  My_App:\n    image: a\n    environment:\n      HOME_DIR: $$HOME\n      REAL: ${REAL}\n",
        &[],
        Some("p"),
    )
    .unwrap();
    assert_eq!(names(&i), ["service/p-my-app"]);
    assert!(i
        .notes
        .iter()
        .any(|n| n.message.contains("named `p-my-app`")));
    assert_eq!(
        spec(&i, Kind::Service, "p-my-app")["env"],
        json!([{"name": "HOME_DIR", "value": "$HOME"}, {"name": "REAL", "value": "${REAL}"}])
    );
    warned(&i, "services.My_App.environment.REAL");
    assert!(!i.warnings.iter().any(|w| w.path.ends_with("HOME_DIR")));
    let e = err("services:\n  my_app:\n    image: a\n  my-app:\n    image: a\n");
    assert!(
        e.contains("becomes service `my-app`, as `services.my-app` does"),
        "{e}"
    );
    let e = run("services: {}\n", &[], Some("Bad_Prefix")).unwrap_err();
    assert!(e.contains("--prefix"), "{e}");
}

/// The shop fixture the e2e test applies: imports without an error, every object valid, and the
/// warnings a user of it sees.
#[test]
fn the_shop_fixture_imports() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/compose/shop");
    let text = std::fs::read_to_string(dir.join("docker-compose.yml")).unwrap();
    let i = import(
        "docker-compose.yml",
        &text,
        &dir,
        &|p| std::fs::read(p),
        &Options {
            prefix: Some("shop".into()),
        },
    )
    .unwrap();
    assert_eq!(
        names(&i),
        [
            "network/shop-backend",
            "network/shop-frontend",
            "volume/shop-db-data",
            "config/shop-index-html",
            "config/shop-worker-conf",
            "service/shop-db",
            "service/shop-web",
            "service/shop-worker",
        ]
    );
    let web = spec(&i, Kind::Service, "shop-web");
    assert_eq!(web["command"], json!(["httpd"]));
    assert_eq!(web["args"], json!(["-f", "-p", "8080", "-h", "/www"]));
    assert_eq!(
        web["update"]["failureAction"], "rollback",
        "merged from the anchor"
    );
    assert_eq!(web["restart"]["maxAttempts"], 5);
    let mut paths: Vec<&str> = i.warnings.iter().map(|w| w.path.as_str()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "services.db.cap_add",
            "services.db.ports[0]",
            "services.web.build",
            "services.web.depends_on",
            "services.web.env_file",
            "services.web.ports[0]",
            "services.worker.logging",
        ]
    );
    assert_eq!(i.ingress_stubs.len(), 1);
    let out = run::stream(&i, "docker-compose.yml");
    assert!(!out.contains("fixture-db-password"), "{out}");
    // Every document of the stream loads as `berth apply -f` loads it.
    let docs = berth_api_types::manifest::parse_str("out.yaml", &out).unwrap();
    assert_eq!(docs.len(), 8);
    for d in &docs {
        berth_api_types::typed::decode_doc(d).unwrap();
    }
}

mod fuzz {
    //! Property tests ("fuzzing", named `fuzz_` as in src/fuzz.rs): a Compose file is input from
    //! whoever wrote it, so no shape of it may panic the import, and whatever it emits must load
    //! as `berth apply -f` loads it.

    use super::*;
    use proptest::prelude::*;

    /// Values built from Compose's own vocabulary, so the generator reaches deep into the mapping
    /// code instead of stopping at the first unknown key.
    fn compose_value() -> impl Strategy<Value = Value> {
        let key = prop::sample::select(vec![
            "image",
            "entrypoint",
            "command",
            "environment",
            "env_file",
            "deploy",
            "replicas",
            "mode",
            "resources",
            "limits",
            "reservations",
            "cpus",
            "memory",
            "update_config",
            "restart_policy",
            "placement",
            "constraints",
            "preferences",
            "spread",
            "healthcheck",
            "test",
            "interval",
            "retries",
            "labels",
            "secrets",
            "configs",
            "source",
            "target",
            "mode",
            "volumes",
            "tmpfs",
            "type",
            "networks",
            "ports",
            "published",
            "external",
            "name",
            "file",
            "content",
            "driver_opts",
            "aliases",
            "web",
            "db",
            "x-a",
            "<<",
        ])
        .prop_map(str::to_string);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (0u64..100_000).prop_map(Value::from),
            prop::sample::select(vec![
                "a",
                "db",
                "web",
                "1s",
                "0.5",
                "64M",
                "80:8080",
                "/data",
                "db:/d:ro",
                "global",
                "CMD",
                "x=1",
                "$X",
                "$$",
                "a.env",
                "",
                "node.role == manager",
            ])
            .prop_map(|s| Value::String(s.to_string())),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 60, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    proptest! {
        #[test]
        fn fuzz_compose_import_never_panics_and_emits_only_valid_objects(
            services in prop::collection::vec(("[a-z_]{1,8}", compose_value()), 0..4),
            top in compose_value(),
        ) {
            let mut doc = match top {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            doc.insert(
                "services".into(),
                Value::Object(services.into_iter().collect()),
            );
            let text = serde_json::to_string(&Value::Object(doc)).unwrap();
            let files = [("a.env", "A=1\nPW=\"x\n"), ("file", "content")];
            if let Ok(i) = run(&text, &files, Some("p")) {
                let out = run::stream(&i, "f");
                let docs = berth_api_types::manifest::parse_str("out", &out).unwrap();
                prop_assert_eq!(docs.len(), i.objects.len());
                for d in &docs {
                    prop_assert!(berth_api_types::typed::decode_doc(d).is_ok());
                }
            }
        }

        #[test]
        fn fuzz_env_files_never_panic(text in any::<String>()) {
            let _ = envfile::parse(&text);
        }
    }
}
