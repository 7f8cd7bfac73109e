//! The table of Compose service keys: which pier maps, which it ignores with a
//! warning, and which are errors because running without them would change
//! what the application does.

/// How pier treats a service key it does not read.
pub(crate) enum Support {
    /// Read and mapped.
    Read,
    /// Ignored without a word: pier does this anyway.
    Quiet,
    /// Ignored, with this warning: the application still means the same.
    Warn(&'static str),
    /// Refused: running without it would change what the application does.
    Error(&'static str),
}

/// The table of Compose service keys.
pub(crate) fn service_key(k: &str) -> Option<Support> {
    use Support::*;
    Some(match k {
        "image" | "command" | "entrypoint" | "environment" | "env_file" | "labels" | "ports"
        | "expose" | "healthcheck" | "deploy" | "x-pier" | "build" | "restart" | "networks"
        | "scale" => Read,
        "init" => Quiet,
        "container_name" => Warn(
            "pier names pod containers itself (pier-<project>-<pod>); reach the service by its Compose name",
        ),
        "hostname" | "domainname" => {
            Warn("each pod's hostname is its pod name; reach the service by its Compose name")
        }
        "depends_on" => Warn(
            "pier starts every service at once and restarts pods that exit, so a dependant retries until its dependency is up",
        ),
        "links" => Warn("every service is reachable by its Compose name already"),
        "stop_grace_period" | "stop_signal" => {
            Warn("pier stops pods with Docker's default signal and timeout")
        }
        "logging" => Warn("pods log with the Docker daemon's default log driver"),
        "platform" => Warn("pods run the image for the node's own platform"),
        "stdin_open" | "tty" => Warn("pods run without a terminal"),
        "pull_policy" => Warn("pier uses a local image, or pulls from the agent's registry"),
        "mem_limit" | "memswap_limit" | "cpus" | "cpu_shares" | "cpu_quota" | "cpuset" => Warn(
            "pier does not set container limits here; use deploy.resources, which pier uses for placement",
        ),
        "annotations" => Warn("pier keeps no annotations"),
        "volumes" => Error(
            "pier does not mount volumes: a pod's data would be lost and its files missing; keep state outside pier, or bake the files into the image",
        ),
        "volumes_from" | "tmpfs" => Error("pier does not mount volumes"),
        "user" | "working_dir" => Error(
            "pier runs the image's own user and working directory; set them in the image (USER, WORKDIR)",
        ),
        "network_mode" | "pid" | "ipc" | "uts" | "userns_mode" | "cgroup" | "cgroup_parent" => {
            Error("pier runs every pod on its own network and namespaces")
        }
        "privileged"
        | "cap_add"
        | "cap_drop"
        | "devices"
        | "device_cgroup_rules"
        | "security_opt"
        | "sysctls"
        | "ulimits"
        | "read_only"
        | "shm_size"
        | "group_add"
        | "oom_kill_disable"
        | "oom_score_adj"
        | "runtime"
        | "isolation"
        | "storage_opt"
        | "gpus" => Error(
            "pier does not set this container option; without it the container runs differently",
        ),
        "secrets" | "configs" => Error(
            "pier does not mount secrets or configs; pass them in environment or env_file, or bake them into the image",
        ),
        "dns" | "dns_search" | "dns_opt" | "extra_hosts" => {
            Error("pier gives pods its own DNS, which answers the project's service names")
        }
        "external_links" => Error("pier does not link to containers outside the application"),
        "profiles" => Error(
            "pier applies every service of the file; remove the profiles, or keep the profiled services in another file",
        ),
        "extends" => Error("extends is not supported; merge the files with -f a.yaml -f b.yaml"),
        "mac_address" | "use_api_socket" | "post_start" | "pre_stop" | "develop" | "attach"
        | "credential_spec" | "provider" | "models" | "label_file" | "blkio_config"
        | "cpu_count" | "cpu_percent" | "cpu_period" | "cpu_rt_period" | "cpu_rt_runtime"
        | "mem_reservation" | "mem_swappiness" | "pids_limit" => {
            Error("pier does not support this key yet")
        }
        _ => return None,
    })
}
