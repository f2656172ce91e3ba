//! The Kubernetes manifests in `deploy/kubernetes/` parse as the API types they claim to be, and
//! say what their comments promise (normal build: k8s-openapi is not compiled under madsim).
#![cfg(not(madsim))]

use k8s_openapi::api::batch::v1::Job;

fn manifest<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = format!("{}/deploy/kubernetes/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} is not a valid object: {e}"))
}

#[test]
fn the_campaign_job_runs_one_shard_per_completion_index() {
    let job: Job = manifest("campaign-job.yaml");
    let spec = job.spec.expect("a job spec");
    assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
    let completions = spec.completions.expect("completions");
    assert_eq!(
        spec.parallelism,
        Some(completions),
        "every shard runs at once"
    );
    assert_eq!(
        spec.backoff_limit,
        Some(0),
        "a failing shard is a result, not a retry"
    );
    let pod = spec.template.spec.expect("a pod spec");
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let c = &pod.containers[0];
    let script = c.args.as_ref().expect("args").join(" ");
    assert!(
        script.contains("--shard \"$((JOB_COMPLETION_INDEX + 1))/$SHARDS\""),
        "{script}"
    );
    assert!(script.contains("--json"), "{script}");
    let env = |name: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("env {name}"))
    };
    assert_eq!(
        env("SHARDS").parse::<i32>().unwrap(),
        completions,
        "the shard count matches the completions"
    );
    assert!(env("SEEDS").parse::<u64>().unwrap() > 0);
    let limits = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .expect("limits");
    assert!(limits.contains_key("cpu") && limits.contains_key("memory"));
}

/// The documents of a multi-document manifest, each to be parsed as its own type.
fn documents(name: &str) -> Vec<serde_yaml::Value> {
    let path = format!("{}/deploy/kubernetes/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::flowcontrol::v1::{FlowSchema, PriorityLevelConfiguration};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde::Deserialize;
use shoal::kubernetes::KubernetesProviderConfig;

fn parse<T: serde::de::DeserializeOwned>(v: &serde_yaml::Value) -> T {
    serde_yaml::from_value(v.clone()).unwrap_or_else(|e| panic!("not a valid object: {e}"))
}

#[test]
fn the_member_role_grants_leases_and_endpointslices_and_nothing_on_pods() {
    let docs = documents("member-rbac.yaml");
    assert_eq!(docs.len(), 3);
    let account: ServiceAccount = parse(&docs[0]);
    let role: Role = parse(&docs[1]);
    let binding: RoleBinding = parse(&docs[2]);
    let verbs = |group: &str, resource: &str| -> Vec<String> {
        role.rules
            .iter()
            .flatten()
            .filter(|r| {
                r.api_groups.iter().flatten().any(|g| g == group)
                    && r.resources.iter().flatten().any(|x| x == resource)
            })
            .flat_map(|r| r.verbs.clone())
            .collect()
    };
    let mut lease = verbs("coordination.k8s.io", "leases");
    lease.sort();
    assert_eq!(
        lease,
        ["create", "delete", "get", "list", "update", "watch"],
        "the provider creates, renews (update), deletes and watches Leases"
    );
    let slices = verbs("discovery.k8s.io", "endpointslices");
    assert!(slices.contains(&"list".into()) && slices.contains(&"watch".into()));
    assert!(
        !slices
            .iter()
            .any(|v| v == "update" || v == "create" || v == "delete")
    );
    assert!(
        verbs("", "pods").is_empty(),
        "nothing on pods: the provider never reads or writes them"
    );
    assert!(role.rules.iter().flatten().all(|r| {
        r.resources
            .iter()
            .flatten()
            .all(|x| x == "leases" || x == "endpointslices")
    }));
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
}

#[test]
fn the_member_deployment_gives_the_provider_what_it_reads() {
    let deployment: Deployment = manifest("member-deployment.yaml");
    let service: Service = manifest("member-service.yaml");
    let account: ServiceAccount = parse(&documents("member-rbac.yaml")[0]);
    let spec = deployment.spec.expect("a spec");
    let pod = spec.template.spec.expect("a pod spec");
    assert_eq!(pod.service_account_name, account.metadata.name);
    let c = &pod.containers[0];
    let env: std::collections::BTreeMap<String, String> = c
        .env
        .iter()
        .flatten()
        .map(|e| {
            let value = e.value.clone().unwrap_or_else(|| {
                // Downward API fields, with example values.
                let field = e
                    .value_from
                    .as_ref()
                    .and_then(|v| v.field_ref.as_ref())
                    .map(|f| f.field_path.clone())
                    .unwrap_or_else(|| panic!("env {} has no value", e.name));
                match field.as_str() {
                    "metadata.namespace" => "shop".into(),
                    "metadata.name" => "shoal-member-7d9f-abcde".into(),
                    "metadata.uid" => "0f1e2d3c".into(),
                    "status.podIP" => "10.1.2.3".into(),
                    other => panic!("unexpected downward API field {other}"),
                }
            });
            (e.name.clone(), value)
        })
        .collect();
    // What the provider reads parses, and names this Deployment's Service.
    let config = KubernetesProviderConfig::from_vars(|k| env.get(k).cloned())
        .expect("the provider's settings from the Deployment's environment");
    assert_eq!(config.namespace, "shop");
    assert_eq!(config.service, service.metadata.name);
    assert_eq!(
        config.pod.expect("an owner Pod").name,
        "shoal-member-7d9f-abcde"
    );
    assert!(env.contains_key("POD_IP"));
    // The headless Service selects these Pods and targets the actor port.
    let svc = service.spec.expect("a service spec");
    assert_eq!(svc.cluster_ip.as_deref(), Some("None"), "headless");
    let labels = spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .expect("labels");
    for (k, v) in svc.selector.iter().flatten() {
        assert_eq!(labels.get(k), Some(v), "the Service selects the Pods");
    }
    let port_names: Vec<String> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    for p in svc.ports.iter().flatten() {
        let target = p.target_port.as_ref().expect("a target port");
        assert!(
            matches!(target, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n) if port_names.contains(n)),
            "{target:?}"
        );
    }
    // Shutdown: a preStop wait, within the grace period.
    let pre_stop = c
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .expect("a preStop hook");
    let waits = pre_stop.sleep.as_ref().map_or(0, |s| s.seconds);
    assert!(waits > 0);
    assert!(pod.termination_grace_period_seconds.unwrap_or(30) > waits + 5);
    assert!(c.readiness_probe.is_some());
}

/// The flow-control manifest gives renewals a priority level of their own, ahead of the reads,
/// for the members' ServiceAccount, and covers every verb the Role grants.
#[test]
fn renewals_have_a_priority_level_apart_from_lists_and_watches() {
    let docs = documents("member-flowcontrol.yaml");
    assert_eq!(docs.len(), 4);
    let levels: Vec<PriorityLevelConfiguration> = docs[..2].iter().map(parse).collect();
    let schemas: Vec<FlowSchema> = docs[2..].iter().map(parse).collect();
    let account: ServiceAccount = parse(&documents("member-rbac.yaml")[0]);
    let level_names: Vec<String> = levels
        .iter()
        .map(|l| l.metadata.name.clone().unwrap())
        .collect();
    let verbs_of = |schema: &FlowSchema, resource: &str| -> Vec<String> {
        let spec = schema.spec.as_ref().unwrap();
        spec.rules
            .iter()
            .flatten()
            .flat_map(|r| r.resource_rules.iter().flatten())
            .filter(|r| r.resources.iter().any(|x| x == resource))
            .flat_map(|r| r.verbs.clone())
            .collect()
    };
    let (renewals, reads) = (&schemas[0], &schemas[1]);
    for schema in &schemas {
        let spec = schema.spec.as_ref().unwrap();
        assert!(level_names.contains(&spec.priority_level_configuration.name));
        let subject = &spec.rules.as_ref().unwrap()[0].subjects[0];
        assert_eq!(
            subject.service_account.as_ref().map(|s| &s.name),
            account.metadata.name.as_ref(),
            "the schemas match the members' ServiceAccount"
        );
    }
    let precedence = |s: &FlowSchema| s.spec.as_ref().unwrap().matching_precedence.unwrap();
    assert!(precedence(renewals) < precedence(reads));
    assert!(
        precedence(reads) < 9000,
        "ahead of the built-in service-accounts schema"
    );
    assert_ne!(
        renewals
            .spec
            .as_ref()
            .unwrap()
            .priority_level_configuration
            .name,
        reads
            .spec
            .as_ref()
            .unwrap()
            .priority_level_configuration
            .name,
        "renewals never queue behind lists"
    );
    let mut writes = verbs_of(renewals, "leases");
    writes.sort();
    assert_eq!(writes, ["create", "delete", "get", "update"]);
    let mut lease_reads = verbs_of(reads, "leases");
    lease_reads.sort();
    assert_eq!(lease_reads, ["list", "watch"]);
    assert!(verbs_of(reads, "endpointslices").contains(&"watch".into()));
}
