use super::ports::*;
use super::routes::*;
use pier_model::Cidr;
use std::net::{Ipv4Addr, SocketAddr};

#[test]
fn proc_net_tables_parse() {
    let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1CCA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1CCA 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4243 1\n";
    let b = parse_proc_net(tcp, Proto::Tcp, false);
    assert_eq!(b.len(), 1, "only the listening socket: {b:?}");
    assert_eq!(b[0].addr, "127.0.0.1:7370".parse::<SocketAddr>().unwrap());
    assert_eq!(b[0].inode, 4242);
    let udp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n  1: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 77 2 0 0\n  2: 0000000000000000FFFF00000100007F:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 78 2 0 0\n";
    let b = parse_proc_net(udp6, Proto::Udp, true);
    assert_eq!(
        b[0].addr,
        "0.0.0.0:53".parse::<SocketAddr>().unwrap(),
        "`::` counts as every address"
    );
    assert_eq!(
        b[1].addr,
        "127.0.0.1:53".parse::<SocketAddr>().unwrap(),
        "v4-mapped is v4"
    );
}

#[test]
fn a_wildcard_or_the_same_address_conflicts() {
    let b = |a: &str| Bound {
        proto: Proto::Udp,
        addr: a.parse().unwrap(),
        inode: 1,
    };
    let want: SocketAddr = "10.213.0.10:53".parse().unwrap();
    assert!(conflicts(&b("0.0.0.0:53"), Proto::Udp, want));
    assert!(conflicts(&b("10.213.0.10:53"), Proto::Udp, want));
    assert!(!conflicts(&b("127.0.0.53:53"), Proto::Udp, want));
    assert!(!conflicts(&b("0.0.0.0:5353"), Proto::Udp, want));
    assert!(!conflicts(&b("0.0.0.0:53"), Proto::Tcp, want));
}

#[test]
fn routes_that_overlap_the_service_cidr() {
    // Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT
    let text = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
*\t0000D50A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
docker0\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n\
pier0\t0A00D50A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
    let routes = parse_routes(text);
    assert_eq!(routes.len(), 5);
    assert_eq!(routes[2].dst, Ipv4Addr::new(10, 213, 0, 0));
    assert_eq!(routes[2].prefix, 16);
    assert!(routes[2].reject);
    // 10.0.0.0/8 on docker0 covers 10.213.0.0/16; the default route,
    // the blackhole and pier0's own do not count.
    let c: Cidr = "10.213.0.0/16".parse().unwrap();
    let bad = conflicting_routes(&c, "pier0", &routes);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].iface, "docker0");
    let c: Cidr = "192.0.2.128/28".parse().unwrap();
    assert_eq!(conflicting_routes(&c, "pier0", &routes)[0].iface, "eth0");
    let c: Cidr = "172.31.0.0/16".parse().unwrap();
    assert!(conflicting_routes(&c, "pier0", &routes).is_empty());
}

#[test]
fn an_orphans_adoption_socket_is_found_listening() {
    let text = "Num       RefCount Protocol Flags    Type St Inode Path\n\
0000000000000000: 00000002 00000000 00010000 0005 01 81234 /var/lib/pier/adopt.sock\n\
0000000000000000: 00000002 00000000 00000000 0005 03 81235 /var/lib/other/adopt.sock\n\
0000000000000000: 00000003 00000000 00000000 0001 03 81236\n";
    assert!(unix_listening(text, "/var/lib/pier/adopt.sock"));
    // Connected, not listening; and no such path.
    assert!(!unix_listening(text, "/var/lib/other/adopt.sock"));
    assert!(!unix_listening(text, "/var/lib/none/adopt.sock"));
}

#[test]
fn low_ports_need_root_or_cap_net_bind_service() {
    let root = "Name:\tpier\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
    let user = "Name:\tpier\nCapEff:\t0000000000000000\n";
    let only_bind = "CapEff:\t0000000000000400\n";
    assert!(cap_net_bind_service(root));
    assert!(!cap_net_bind_service(user));
    assert!(cap_net_bind_service(only_bind));
    assert!(
        cap_net_bind_service(""),
        "unreadable: no failure on a guess"
    );
    let p = |start, cap| Privilege {
        unprivileged_port_start: start,
        net_bind_service: cap,
    };
    assert!(!may_bind_port(53, &p(1024, false)));
    assert!(may_bind_port(53, &p(1024, true)));
    assert!(
        may_bind_port(53, &p(0, false)),
        "a sysctl that opens low ports"
    );
    assert!(may_bind_port(7370, &p(1024, false)));
}
