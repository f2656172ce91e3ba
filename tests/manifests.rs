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
