//! What Docker says: events, lists after a reconnect or a resync, and the
//! networks, into the agent's container map.

use super::*;

impl Agent {
    pub(super) async fn on_docker(&mut self, m: DockerMsg) {
        match m {
            DockerMsg::Up(d) => {
                info!("connected to dockerd");
                self.docker = Some(d);
                // Schedulable again (the node record is written by the
                // next reconcile).
                self.node.runtime_down_since = None;
                self.pod_waiting.clear();
                self.resync_docker(true);
            }
            DockerMsg::Down(why) => {
                warn!(error = %why, "dockerd connection lost; keeping registrations until it is back");
                self.docker = None;
                // The supervisor places nothing here meanwhile, and moves
                // this node's pending pods after a grace.
                self.node.runtime_down_since.get_or_insert_with(now_ms);
            }
            DockerMsg::Event(ev) => self.on_event(*ev).await,
        }
    }

    /// Start a full list + inspect in the background, so events keep
    /// flowing while a host with many containers is listed. Its result is
    /// merged in [`Self::on_resync`].
    pub(super) fn resync_docker(&mut self, force: bool) {
        let Some(d) = self.docker.clone() else { return };
        if self.resync_running && !force {
            return;
        }
        self.resync_running = true;
        self.resync_gen += 1;
        let generation = self.resync_gen;
        let seq = self.event_seq;
        let filter = self.cfg.filter_labels.clone();
        let node = self.node.name.to_string();
        let pod_network = self.cfg.pod_network.clone();
        let host_ip = self.host_ip();
        let tx = self.op_tx.clone();
        let cancel = self.tasks_cancel.clone();
        self.spawn(async move {
            let work = async {
                let list = docker::list(&d, &filter, &node, pod_network.as_deref(), host_ip).await;
                let nets = docker::networks(&d).await;
                (list, nets)
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                (list, nets) = work => {
                    let _ = tx.send(OpMsg::Resync { generation, seq, list, nets });
                }
            }
        });
    }

    pub(super) fn on_resync(
        &mut self,
        generation: u64,
        seq: u64,
        list: Result<HashMap<String, Container>, AgentError>,
        nets: Result<HashMap<String, docker::Net>, AgentError>,
    ) {
        if generation != self.resync_gen {
            return;
        }
        self.resync_running = false;
        match list {
            Ok(map) => {
                let map = merge_listed(map, &self.containers, &self.touched, seq);
                self.touched.clear();
                debug!(containers = map.len(), "docker resync");
                self.containers = map;
                self.docker_synced = true;
            }
            Err(e) => warn!(error = %e, "docker resync failed; will retry"),
        }
        match nets {
            Ok(nets) => {
                self.docker_nets = merge_listed(nets, &self.docker_nets, &self.nets_touched, seq);
                self.nets_touched.clear();
                self.publish_networks();
            }
            Err(e) => warn!(error = %e, "listing docker networks failed"),
        }
    }

    /// Give the DNS ACL the subnets of every network, if they changed.
    pub(super) fn publish_networks(&mut self) {
        for (id, n) in &self.docker_nets {
            if let Some(driver) = &n.lan_driver
                && self.lan_warned.insert(id.clone())
            {
                info!(network.id = %id, %driver,
                    "DNS does not answer this network's containers: a {driver} network is usually the LAN itself; add its CIDR to [dns] allow to answer them");
            }
        }
        let nets = docker::all_subnets(&self.docker_nets);
        self.networks.send_if_modified(|v| {
            if *v != nets {
                debug!(subnets = ?nets, "docker networks changed");
                *v = nets;
                true
            } else {
                false
            }
        });
    }

    /// A network event: `create` and a `connect` to a network not yet known
    /// inspect it and add its subnets; `destroy` removes them. Either way the
    /// ACL has them before a container on the network can send a query (a
    /// container joins its networks before its process starts).
    pub(super) async fn on_network_event(&mut self, verb: &str, id: String) {
        match verb {
            "create" | "connect" => {
                if verb == "connect" && self.docker_nets.contains_key(&id) {
                    return;
                }
                let Some(d) = self.docker.clone() else { return };
                match docker::inspect_network(&d, &id).await {
                    Ok(Some(net)) => {
                        self.touch_net(&id);
                        debug!(network.id = %id, subnets = ?net.subnets, "docker network added");
                        self.docker_nets.insert(id, net);
                    }
                    Ok(None) => {
                        self.touch_net(&id);
                        self.docker_nets.remove(&id);
                    }
                    Err(e) => {
                        warn!(network.id = %id, error = %e, "inspecting a new network failed; the next resync repairs it");
                        return;
                    }
                }
            }
            "destroy" => {
                self.touch_net(&id);
                if self.docker_nets.remove(&id).is_none() {
                    return;
                }
                debug!(network.id = %id, "docker network removed");
            }
            _ => return,
        }
        self.publish_networks();
    }

    pub(super) fn touch_net(&mut self, id: &str) {
        self.event_seq += 1;
        self.nets_touched.insert(id.to_owned(), self.event_seq);
    }

    pub(super) fn touch(&mut self, id: &str) {
        self.event_seq += 1;
        self.touched.insert(id.to_owned(), self.event_seq);
    }

    pub(super) async fn inspect_into_map(&mut self, id: &str) {
        let Some(d) = self.docker.clone() else { return };
        match docker::inspect(&d, id, self.cfg.pod_network.as_deref(), self.host_ip()).await {
            Ok(Some(c)) => {
                self.touch(id);
                self.containers.insert(c.id.clone(), c);
            }
            Ok(None) => {
                self.touch(id);
                self.containers.remove(id);
            }
            Err(e) => {
                warn!(container.id = id, error = %e, "inspect failed; the next resync repairs it");
            }
        }
    }

    pub(super) async fn on_event(&mut self, ev: EventMessage) {
        let action = ev.action.unwrap_or_default();
        let Some(actor) = ev.actor else { return };
        let Some(id) = actor.id else { return };
        // Actions carry suffixes (`health_status: healthy`, `exec_start: sh`):
        // match on the prefix.
        let verb = action.split(':').next().unwrap_or("").trim();
        if ev.typ == Some(bollard::models::EventMessageTypeEnum::NETWORK) {
            debug!(network.id = %id, action = %action, "docker network event");
            return self.on_network_event(verb, id).await;
        }
        debug!(container.id = %id, action = %action, "docker event");
        match verb {
            "start" | "unpause" | "restart" | "rename" | "update" => {
                self.inspect_into_map(&id).await;
            }
            "die" => {
                self.touch(&id);
                if let Some(c) = self.containers.get_mut(&id) {
                    c.running = false;
                    c.exit_code = actor
                        .attributes
                        .as_ref()
                        .and_then(|a| a.get("exitCode"))
                        .and_then(|s| s.parse().ok())
                        .or(c.exit_code);
                }
            }
            "kill" | "stop" | "pause" => {
                self.touch(&id);
                if let Some(c) = self.containers.get_mut(&id) {
                    c.held = true;
                    // A terminating signal is followed by `die` (or, if the
                    // process ignores it, the next resync brings the
                    // endpoint back); any other signal is looked at again soon.
                    let signal = actor
                        .attributes
                        .as_ref()
                        .and_then(|a| a.get("signal"))
                        .map(String::as_str)
                        .unwrap_or("");
                    let terminating = matches!(
                        signal,
                        "9" | "15" | "2" | "3" | "SIGKILL" | "SIGTERM" | "SIGINT" | "SIGQUIT"
                    );
                    if verb == "kill" && !terminating {
                        let tx = self.op_tx.clone();
                        let cancel = self.tasks_cancel.clone();
                        self.spawn(async move {
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                _ = tokio::time::sleep(KILL_RECHECK) => {
                                    let _ = tx.send(OpMsg::Recheck(id));
                                }
                            }
                        });
                    }
                }
            }
            "destroy" => {
                self.touch(&id);
                self.containers.remove(&id);
            }
            "health_status" => {
                let status = action.split_once(':').map(|x| x.1.trim()).unwrap_or("");
                if self.containers.contains_key(&id) {
                    self.touch(&id);
                }
                if let Some(c) = self.containers.get_mut(&id) {
                    c.docker_healthy = Some(status == "healthy");
                }
            }
            _ => {}
        }
    }
}

/// The result of a full list, merged with what events said while it ran:
/// an entry an event touched after the list started (`touched[id] > seq`)
/// keeps the event's state (present in `current` or gone), everything else
/// is as listed.
pub(super) fn merge_listed<V: Clone>(
    mut listed: HashMap<String, V>,
    current: &HashMap<String, V>,
    touched: &HashMap<String, u64>,
    seq: u64,
) -> HashMap<String, V> {
    for (id, s) in touched {
        if *s > seq {
            match current.get(id) {
                Some(v) => {
                    listed.insert(id.clone(), v.clone());
                }
                None => {
                    listed.remove(id);
                }
            }
        }
    }
    listed
}

#[cfg(test)]
mod merge_tests {
    use super::merge_listed;
    use std::collections::HashMap;

    fn m(kv: &[(&str, u32)]) -> HashMap<String, u32> {
        kv.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn events_after_the_list_started_win_and_older_ones_do_not() {
        // The list started at seq 5. Since then: "new" was created (7), "gone"
        // destroyed (6), "changed" updated to 2 (8). "old" was touched at 3,
        // before the list, so the list's view of it stands.
        let listed = m(&[("gone", 1), ("changed", 1), ("old", 9), ("kept", 1)]);
        let current = m(&[("new", 1), ("changed", 2), ("old", 4)]);
        let touched: HashMap<String, u64> = [("new", 7), ("gone", 6), ("changed", 8), ("old", 3)]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        let got = merge_listed(listed, &current, &touched, 5);
        assert_eq!(
            got,
            m(&[("new", 1), ("changed", 2), ("old", 9), ("kept", 1)])
        );
    }
}
