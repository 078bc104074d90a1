-- osstream catalog, version 3: DHCP. A client's reserved IPv4 address, and the leases the
-- full-DHCP mode hands out, kept here so a restarted server (or another server on the same
-- catalog) never hands an address out twice. Addresses are IPv4 as integers, so a pool's
-- range is one indexed query. Times are Unix milliseconds.
ALTER TABLE clients ADD COLUMN ip BIGINT;
CREATE UNIQUE INDEX clients_ip ON clients (ip);

CREATE TABLE dhcp_leases (
    ip         BIGINT PRIMARY KEY,
    mac        TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX dhcp_leases_mac ON dhcp_leases (mac);
