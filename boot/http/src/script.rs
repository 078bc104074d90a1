//! iPXE scripts built from the catalog: the chain script, a client's menu, a vdisk's boot.
//!
//! Pure functions from catalog records to script text, so every script is unit-tested
//! without a server. Text that comes from the catalog (descriptions, error messages) is
//! made inert before it reaches a script: iPXE would expand `${...}` and obey `||`/`&&`.

use std::fmt::Write as _;
use std::time::Duration;

use osstream_core::{BootChoice, BootClient, BootKind};
use sha2::{Digest, Sha256};

/// Who a booting client is, as its boot tells it: the same on every boot of that client,
/// different for every client, whichever vdisk it boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The MAC, normalised (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// The catalog's hostname for it, else its name, else `osstream-` and its MAC's hex.
    pub hostname: String,
    /// 32 hex digits derived from the MAC (systemd's machine-id format).
    pub machine_id: String,
}

impl Identity {
    /// The identity of `mac` (normalised), with what the catalog knows of it.
    pub fn of(mac: &str, client: Option<&BootClient>) -> Self {
        let hostname = client
            .and_then(|c| c.hostname.clone().or_else(|| c.name.clone()))
            .filter(|h| is_hostname(h))
            .unwrap_or_else(|| format!("osstream-{}", mac.replace(':', "")));
        Identity {
            mac: mac.to_owned(),
            hostname,
            machine_id: machine_id(mac),
        }
    }

    /// The MAC as a URL path segment (`aa-bb-cc-dd-ee-ff`).
    pub fn mac_segment(&self) -> String {
        self.mac.replace(':', "-")
    }
}

/// A machine-id for the client with this MAC: stable across its boots, so its journal and
/// DHCP client id stay its own, and different from every other client's, so clones of one
/// vdisk never share one. Not secret: it only has to be unique.
pub fn machine_id(mac: &str) -> String {
    let digest = Sha256::digest(format!("osstream machine-id\0{mac}").as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
}

/// Catalog text made safe for a script line: printable ASCII, no expansion, no operators.
pub fn inert(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '$' => out.push('S'),
            '|' => out.push('/'),
            '&' => out.push('+'),
            '#' => out.push('N'),
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            _ => out.push('?'),
        }
    }
    out
}

/// `/boot.ipxe`: every iPXE client starts here and is sent to its own script.
pub fn chain_script(base_url: &str) -> String {
    format!(
        "#!ipxe\n\
         # osstream: each client's own script, by the MAC it booted from\n\
         :retry\n\
         chain --autofree {base_url}/ipxe/${{mac:hexhyp}} || goto failed\n\
         exit 0\n\
         :failed\n\
         echo osstream: no boot from {base_url} (the reason is above)\n\
         prompt --timeout 10000 Press any key to try again ||\n\
         goto retry\n"
    )
}

/// A script that shows `lines`, waits a little so they can be read, and leaves iPXE
/// without an error (the firmware tries its next boot device): nothing failed, this
/// machine has nothing to boot here.
pub fn message_script(lines: &[String]) -> String {
    let mut script = String::from("#!ipxe\n");
    for line in lines {
        let line = osstream_core::shorten(line, 300);
        let _ = writeln!(script, "echo osstream: {}", inert(&line));
    }
    script.push_str("prompt --timeout 15000 Press any key to continue ||\nexit 0\n");
    script
}

/// A client's menu: its vdisks in assignment order with the default preselected, then
/// the local disk and an iPXE shell, as LTSP's menu has them.
pub fn menu_script(
    base_url: &str,
    identity: &Identity,
    menu: &[BootChoice],
    timeout: Duration,
) -> String {
    let mac = identity.mac_segment();
    // A disabled vdisk is listed (so the menu can say so) but never preselected.
    let default = menu
        .iter()
        .position(|c| c.is_default && c.enabled)
        .or_else(|| menu.iter().position(|c| c.enabled))
        .unwrap_or(0);
    let mut script = String::from("#!ipxe\n:start\n");
    let _ = writeln!(
        script,
        "menu osstream: {} ({})",
        inert(&identity.hostname),
        identity.mac
    );
    script.push_str("item --gap -- Virtual disks:\n");
    for (i, choice) in menu.iter().enumerate() {
        let mut text = choice.vdisk.clone();
        if !choice.description.is_empty() {
            text.push_str(" - ");
            text.push_str(&choice.description);
        }
        if !choice.enabled {
            text.push_str(" (disabled)");
        }
        let _ = writeln!(script, "item vd{i} {}", inert(&text));
    }
    script.push_str(
        "item --gap -- Other:\n\
         item local Boot from the local disk\n\
         item shell iPXE shell\n",
    );
    let _ = writeln!(
        script,
        "choose --default vd{default} --timeout {} target || goto shell\ngoto ${{target}}",
        timeout.as_millis().max(1)
    );
    for (i, choice) in menu.iter().enumerate() {
        let _ = writeln!(
            script,
            ":vd{i}\nchain --autofree {base_url}/ipxe/{mac}/{} || goto failed\ngoto start",
            choice.vdisk
        );
    }
    script.push_str(
        ":local\n\
         echo osstream: booting from the local disk\n\
         iseq ${platform} efi && exit 0 ||\n\
         sanboot --no-describe --drive 0x80 || exit 0\n\
         :shell\n\
         echo osstream: type exit to return to the menu\n\
         shell\n\
         goto start\n\
         :failed\n\
         echo osstream: that boot failed (the reason is above)\n\
         prompt --timeout 15000 Press any key for the menu ||\n\
         goto start\n",
    );
    script
}

/// Where a booting kernel finds its session's disk.
#[derive(Debug, Clone)]
pub struct SessionBoot<'a> {
    /// The session's token (reaches its files and its disk; never logged).
    pub token: &'a str,
    /// Its export name, `s/<token>`.
    pub export: &'a str,
    /// The NBD server's `HOST:PORT`, if one serves sessions.
    pub nbd_address: Option<&'a str>,
}

/// The script that boots `choice` in the session `session`, or the lines saying why it
/// cannot (for [`message_script`]).
pub fn boot_script(
    base_url: &str,
    identity: &Identity,
    choice: &BootChoice,
    session: &SessionBoot<'_>,
) -> Result<String, Vec<String>> {
    let token = session.token;
    let mut script = String::from("#!ipxe\n");
    let _ = writeln!(
        script,
        "echo osstream: booting {} on {} ({})",
        inert(&choice.vdisk),
        inert(&identity.hostname),
        identity.mac
    );
    match choice.boot {
        BootKind::Sanboot => {
            let _ = writeln!(script, "sanboot {base_url}/san/{token} || goto failed");
        }
        BootKind::LinuxNbd | BootKind::LinuxNbdDracut => {
            let (Some(_), Some(_)) = (&choice.kernel, &choice.initrd) else {
                return Err(vec![format!(
                    "vdisk {} boots linux-nbd but has no kernel or initrd: osstream vdisk set {} --kernel KEY --initrd KEY",
                    choice.vdisk, choice.vdisk
                )]);
            };
            let Some(nbd) = session.nbd_address else {
                return Err(vec![
                    "no NBD listener with a public address serves sessions: set nbd.public_address"
                        .to_owned(),
                ]);
            };
            let style = match choice.boot {
                BootKind::LinuxNbdDracut => RootStyle::Dracut,
                _ => RootStyle::InitramfsTools,
            };
            let cmdline = kernel_cmdline(
                style,
                choice.cmdline.as_deref(),
                nbd,
                session.export,
                identity,
            )
            .map_err(|why| vec![format!("vdisk {}: {why}", choice.vdisk)])?;
            // Where the client agent (osstream-agent --cmdline) asks about its disk; a
            // stock initramfs ignores it.
            let cmdline = format!("{cmdline} osstream.agent={base_url}/agent/{token}");
            let _ = writeln!(
                script,
                "kernel --name kernel {base_url}/boot/{token}/kernel initrd=initrd {} || goto failed\n\
                 initrd --name initrd {base_url}/boot/{token}/initrd || goto failed\n\
                 boot || goto failed",
                inert(&cmdline)
            );
        }
    }
    script.push_str(
        ":failed\n\
         echo osstream: the boot failed (the reason is above)\n\
         prompt --timeout 15000 Press any key to continue ||\n\
         exit 1\n",
    );
    Ok(script)
}

/// Which initramfs generator reads the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootStyle {
    /// Debian's initramfs-tools with the `nbd-client` hook (`scripts/local-top/nbd`).
    InitramfsTools,
    /// dracut's `nbd` module (`nbdroot.sh`).
    Dracut,
}

/// The kernel command line of a `linux-nbd` boot: the vdisk's own `cmdline`, then the NBD
/// root as `style` reads it, networking (unless the vdisk sets `ip=` itself), and the
/// client's identity for systemd (`systemd.hostname=`, `systemd.machine_id=`).
///
/// - initramfs-tools: `root=/dev/nbd0 nbdroot=HOST:PORT/EXPORT ip=::::HOSTNAME::dhcp`
///   (its hook reads `HOST:PORT/EXPORT`; the comma forms would mean server,port).
/// - dracut: `root=nbd:HOST:EXPORT rd.neednet=1 ip=dhcp`. dracut's fields are
///   `nbd:server:port[:fstype[:rootflags[:nbdopts]]]` and a port that is not a number is
///   taken as an export name on the default port, so NBD must listen on 10809.
pub fn kernel_cmdline(
    style: RootStyle,
    vdisk: Option<&str>,
    nbd: &str,
    export: &str,
    identity: &Identity,
) -> Result<String, String> {
    let vdisk = vdisk.unwrap_or("").trim();
    let has = |key: &str| vdisk.split_whitespace().any(|word| word.starts_with(key));
    let mut words: Vec<String> = Vec::new();
    if !vdisk.is_empty() {
        words.push(vdisk.to_owned());
    }
    match style {
        RootStyle::InitramfsTools => {
            if !has("root=") {
                words.push("root=/dev/nbd0".to_owned());
            }
            words.push(format!("nbdroot={nbd}/{export}"));
            if !has("ip=") {
                words.push(format!("ip=::::{}::dhcp", identity.hostname));
            }
        }
        RootStyle::Dracut => {
            let (host, port) = nbd.rsplit_once(':').unwrap_or((nbd, "10809"));
            if port != "10809" || host.contains(':') {
                return Err(format!(
                    "dracut reaches NBD export names on port 10809 over IPv4 only, and this server's NBD address is {nbd}"
                ));
            }
            words.push(format!("root=nbd:{host}:{export}"));
            words.push("rd.neednet=1".to_owned());
            if !has("ip=") {
                words.push("ip=dhcp".to_owned());
            }
        }
    }
    words.push(format!("systemd.hostname={}", identity.hostname));
    words.push(format!("systemd.machine_id={}", identity.machine_id));
    Ok(words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(name: &str, default: bool, boot: BootKind) -> BootChoice {
        BootChoice {
            vdisk: name.into(),
            description: format!("{name} ${{evil}} || shell"),
            is_default: default,
            boot,
            kernel: Some("vmlinuz".into()),
            initrd: Some("initrd.img".into()),
            cmdline: Some("console=ttyS0".into()),
            backend: "default".into(),
            enabled: true,
        }
    }

    fn identity() -> Identity {
        Identity::of("52:54:00:12:34:56", None)
    }

    #[test]
    fn identities_are_stable_distinct_and_named_from_the_catalog() {
        let a = identity();
        assert_eq!(a, identity());
        assert_eq!(a.hostname, "osstream-525400123456");
        assert_eq!(a.machine_id.len(), 32);
        assert!(a.machine_id.bytes().all(|b| b.is_ascii_hexdigit()));
        let b = Identity::of("52:54:00:12:34:57", None);
        assert_ne!(a.machine_id, b.machine_id);
        let client = BootClient {
            mac: "52:54:00:12:34:56".into(),
            name: Some("pc1".into()),
            hostname: Some("lab-pc-01".into()),
            group: None,
            ip: None,
            first_seen: None,
            last_seen: None,
        };
        assert_eq!(
            Identity::of(&client.mac, Some(&client)).hostname,
            "lab-pc-01"
        );
    }

    #[test]
    fn the_menu_lists_vdisks_in_order_with_the_default_and_the_ltsp_extras() {
        let menu = [
            choice("alpha", false, BootKind::LinuxNbd),
            choice("beta", true, BootKind::Sanboot),
        ];
        let script = menu_script("http://s:8080", &identity(), &menu, Duration::from_secs(5));
        assert!(script.starts_with("#!ipxe\n"));
        let alpha = script.find("item vd0 alpha").unwrap();
        let beta = script.find("item vd1 beta").unwrap();
        assert!(alpha < beta);
        assert!(script.contains("choose --default vd1 --timeout 5000 target"));
        assert!(script.contains("item local "));
        assert!(script.contains("item shell "));
        assert!(script.contains("chain --autofree http://s:8080/ipxe/52-54-00-12-34-56/beta"));
        // Descriptions cannot expand settings or run commands.
        assert!(!script.contains("${evil}"));
        assert!(!script.contains("|| shell\n"));
    }

    #[test]
    fn a_disabled_default_is_listed_but_not_preselected_and_a_return_goes_back_to_the_menu() {
        let mut off = choice("alpha", true, BootKind::LinuxNbd);
        off.enabled = false;
        let menu = [off, choice("beta", false, BootKind::Sanboot)];
        let script = menu_script("http://s", &identity(), &menu, Duration::from_secs(5));
        assert!(
            script.contains("item vd0 alpha - alpha S{evil} // shell (disabled)"),
            "{script}"
        );
        assert!(script.contains("choose --default vd1 "));
        assert!(script.contains("/ipxe/52-54-00-12-34-56/alpha || goto failed\ngoto start\n"));
    }

    #[test]
    fn a_linux_nbd_boot_tells_the_initramfs_its_session_and_identity() {
        let session = SessionBoot {
            token: "tok",
            export: "s/tok",
            nbd_address: Some("10.0.0.1:10809"),
        };
        let script = boot_script(
            "http://s",
            &identity(),
            &choice("deb", true, BootKind::LinuxNbd),
            &session,
        )
        .unwrap();
        assert!(script.contains("kernel --name kernel http://s/boot/tok/kernel initrd=initrd console=ttyS0 root=/dev/nbd0 nbdroot=10.0.0.1:10809/s/tok ip=::::osstream-525400123456::dhcp systemd.hostname=osstream-525400123456 systemd.machine_id="));
        assert!(script.contains("initrd --name initrd http://s/boot/tok/initrd"));
        let lines = boot_script(
            "http://s",
            &identity(),
            &choice("deb", true, BootKind::LinuxNbd),
            &SessionBoot {
                nbd_address: None,
                ..session.clone()
            },
        )
        .unwrap_err();
        assert!(lines[0].contains("nbd.public_address"));
        let san = boot_script(
            "http://s",
            &identity(),
            &choice("win", true, BootKind::Sanboot),
            &session,
        )
        .unwrap();
        assert!(san.contains("sanboot http://s/san/tok"));
    }

    #[test]
    fn the_vdisk_cmdline_wins_over_generated_root_and_ip() {
        let line = kernel_cmdline(
            RootStyle::InitramfsTools,
            Some("root=/dev/nbd0p1 ip=dhcp quiet"),
            "h:1",
            "s/t",
            &identity(),
        )
        .unwrap();
        assert!(!line.contains("root=/dev/nbd0 "));
        assert!(!line.contains("ip=::::"));
        assert!(line.starts_with("root=/dev/nbd0p1 ip=dhcp quiet nbdroot=h:1/s/t "));
    }

    #[test]
    fn dracut_gets_its_own_root_form_on_the_default_port_only() {
        let line = kernel_cmdline(
            RootStyle::Dracut,
            None,
            "10.0.0.1:10809",
            "s/t",
            &identity(),
        )
        .unwrap();
        assert!(line.starts_with("root=nbd:10.0.0.1:s/t rd.neednet=1 ip=dhcp systemd.hostname="));
        let err = kernel_cmdline(
            RootStyle::Dracut,
            None,
            "10.0.0.1:10900",
            "s/t",
            &identity(),
        );
        assert!(err.unwrap_err().contains("10809"));
    }

    #[test]
    fn messages_are_inert() {
        let script = message_script(&["client ${net0/mac} && shell".to_owned()]);
        assert!(script.contains("echo osstream: client S{net0/mac} ++ shell\n"));
    }
}
