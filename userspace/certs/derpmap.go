package certs

import (
	"encoding/json"
	"fmt"
	"net/netip"
)

// DERPNode is the subset of Tailscale's tailcfg.DERPNode that an operator
// pastes into a tailnet policy file's derpMap. Field names and JSON keys
// match tailcfg; zero values are omitted like tailcfg does.
type DERPNode struct {
	Name      string `json:"Name"`
	RegionID  int    `json:"RegionID"`
	HostName  string `json:"HostName"`
	CertName  string `json:"CertName,omitempty"`
	IPv4      string `json:"IPv4,omitempty"`
	IPv6      string `json:"IPv6,omitempty"`
	STUNPort  int    `json:"STUNPort,omitempty"`
	DERPPort  int    `json:"DERPPort,omitempty"`
	CanPort80 bool   `json:"CanPort80,omitempty"`
}

// NodeInfo is what the daemon knows about its own listeners.
type NodeInfo struct {
	Name     string       // node name; default "900a"
	RegionID int          // default 900 (900-999 are reserved for self-run DERP servers)
	IPs      []netip.Addr // public addresses; the first IPv4 and first IPv6 are used
	DERPPort int          // TLS port; 443 is written as 0 (the default)
	STUNPort int          // 3478 is written as 0; -1 means STUN disabled
	HTTPPort int          // port-80 listener; CanPort80 only if exactly 80
}

// DERPMapNode returns the DERP map node for this server: its host name, the
// given addresses and ports, and CertName when the certificate is pinned
// (self-signed). When the host name is itself an IP address it is also used
// as IPv4/IPv6 if none was given.
func (p *Provider) DERPMapNode(info NodeInfo) DERPNode {
	n := DERPNode{
		Name:     info.Name,
		RegionID: info.RegionID,
		HostName: p.cfg.Hostname,
		CertName: p.CertName(),
	}
	if n.Name == "" {
		n.Name = "900a"
	}
	if n.RegionID == 0 {
		n.RegionID = 900
	}
	ips := info.IPs
	if a, err := netip.ParseAddr(p.cfg.Hostname); err == nil {
		ips = append(ips, a)
	}
	for _, a := range ips {
		a = a.Unmap()
		switch {
		case a.Is4() && n.IPv4 == "":
			n.IPv4 = a.String()
		case a.Is6() && n.IPv6 == "":
			n.IPv6 = a.String()
		}
	}
	if info.DERPPort != 443 {
		n.DERPPort = info.DERPPort
	}
	if info.STUNPort != 3478 {
		n.STUNPort = info.STUNPort
	}
	n.CanPort80 = info.HTTPPort == 80
	return n
}

// DERPMapJSON returns a complete one-region DERP map holding node, ready to
// paste under "derpMap" in a tailnet policy file.
func DERPMapJSON(node DERPNode, regionCode, regionName string) ([]byte, error) {
	if regionCode == "" {
		regionCode = "xderp"
	}
	if regionName == "" {
		regionName = "xderp " + node.HostName
	}
	m := map[string]any{
		"Regions": map[string]any{
			fmt.Sprint(node.RegionID): map[string]any{
				"RegionID":   node.RegionID,
				"RegionCode": regionCode,
				"RegionName": regionName,
				"Nodes":      []DERPNode{node},
			},
		},
	}
	return json.MarshalIndent(m, "", "  ")
}
