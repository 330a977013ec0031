package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/notifier"
)

func writeConfig(t *testing.T, s string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "c.yaml")
	require.NoError(t, os.WriteFile(p, []byte(s), 0o600))
	return p
}

func TestTheShippedConfigIsTheDefault(t *testing.T) {
	c, err := loadConfig("../../configs/citypulse.yaml", nil)
	require.NoError(t, err)
	require.Equal(t, DefaultConfig(), c, "configs/citypulse.yaml documents the defaults: keep them equal")
}

func TestEnvironmentOverridesEveryKey(t *testing.T) {
	t.Setenv("CITYPULSE_INGEST_MQTT_ADDR", "127.0.0.1:11883")
	t.Setenv("CITYPULSE_PIPELINE_FSYNC_INTERVAL", "250ms")
	t.Setenv("CITYPULSE_PIPELINE_BATCH_MAX_READINGS", "77")
	t.Setenv("CITYPULSE_DATA_DIR", "/tmp/x")
	c, err := loadConfig(writeConfig(t, "ingest:\n  mqtt:\n    addr: \":2883\"\n"), nil)
	require.NoError(t, err)
	require.Equal(t, "127.0.0.1:11883", c.Ingest.MQTT.Addr, "env beats the file")
	require.Equal(t, 250*time.Millisecond, c.Pipeline.FsyncInterval)
	require.Equal(t, 77, c.Pipeline.Batch.MaxReadings)
	require.Equal(t, "/tmp/x", c.DataDir)
}

func TestFlagsBeatEnvironmentAndFile(t *testing.T) {
	t.Setenv("CITYPULSE_HTTP_ADDR", ":9999")
	c, err := loadConfig("", map[string]any{"http.addr": "127.0.0.1:18080"})
	require.NoError(t, err)
	require.Equal(t, "127.0.0.1:18080", c.HTTP.Addr)
}

func TestBadConfigIsRejectedWithTheKeyNamed(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		env  map[string]string
		want string
	}{
		{"an unknown key", "ingest:\n  mqtt:\n    adress: \":1\"\n", nil, "adress"},
		{"an unknown section", "alerting:\n  x: 1\n", nil, "alerting"},
		{"an unknown environment variable", "", map[string]string{"CITYPULSE_INGEST_MQTT_ADRESS": "x"}, "CITYPULSE_INGEST_MQTT_ADRESS"},
		{"an invalid fsync policy", "pipeline:\n  fsync: sometimes\n", nil, "pipeline.fsync"},
		{"a bad duration", "pipeline:\n  fsync_interval: soon\n", nil, "fsync_interval"},
		{"a short admin token", "http:\n  admin_token: abc\n", nil, "http.admin_token"},
		{"an address without a port", "ingest:\n  coap:\n    addr: localhost\n", nil, "ingest.coap.addr"},
		{"a CoAP per-source bound above the total", "", map[string]string{"CITYPULSE_INGEST_COAP_BLOCKWISE_MAX_UPLOADS_PER_SOURCE": "5000"}, "ingest.coap.blockwise.max_uploads_per_source"},
		{"an ingest window the store cannot hold", "ingest:\n  max_past: 400h\n", nil, "ingest.max_past"},
		{"a bad sink batch policy", "storage:\n  tsdb:\n    batch:\n      max_readings: 10\n", nil, "storage.tsdb.batch.max_age"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := loadConfig(writeConfig(t, tc.yaml), nil)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestPrintConfigMasksSecrets(t *testing.T) {
	c := DefaultConfig()
	c.HTTP.AdminToken = "super-secret-admin-token"
	c.HTTP.ReadToken = "super-secret-read-token"
	c.HTTP.OperatorToken = "super-secret-operator-token"
	c.Ingest.External.Password = "super-secret-broker-password"
	c.Storage.Influx.Token = "super-secret-influx-token"
	c.Storage.RemoteWrite.BearerToken = "super-secret-remote-write-token"
	c.Cluster.Password = "super-secret-nats-password"
	c.Cluster.Token = "super-secret-nats-token"
	c.Rules.Notify.Receivers = []notifier.ReceiverConfig{{Name: "ops", Type: "webhook", URL: "http://x", Secret: "super-secret-hmac-key"}}
	var b syncBuffer
	require.NoError(t, printConfig(&b, c))
	require.NotContains(t, b.String(), "super-secret")
	require.Contains(t, b.String(), "********")
	require.Equal(t, "super-secret-hmac-key", c.Rules.Notify.Receivers[0].Secret, "the caller's config is not changed")
}

func TestClusterSection(t *testing.T) {
	t.Setenv("CITYPULSE_CLUSTER_URLS", "nats://10.0.0.1:4222,nats://10.0.0.2:4222")
	t.Setenv("CITYPULSE_CLUSTER_PARTITIONS", "16")
	t.Setenv("CITYPULSE_CLUSTER_NODE_ID", "cp-east-2")
	c, err := loadConfig(writeConfig(t, "cluster:\n  enabled: true\nstorage:\n  remote_write:\n    enabled: true\n    url: http://127.0.0.1:8428/api/v1/write\n"), nil)
	require.NoError(t, err)
	require.True(t, c.Cluster.Enabled)
	require.Equal(t, []string{"nats://10.0.0.1:4222", "nats://10.0.0.2:4222"}, c.Cluster.URLs)
	require.Equal(t, 16, c.Cluster.Partitions)
	require.Equal(t, "cp-east-2", c.Cluster.NodeID)
	require.Equal(t, "CITYPULSE_READINGS", c.Cluster.Stream, "the defaults of the keys not set")
}

func TestTheRemovedClusterIndexInTheEnvironmentNamesNodeID(t *testing.T) {
	t.Setenv("CITYPULSE_CLUSTER_INDEX", "2")
	_, err := loadConfig("", nil)
	require.ErrorContains(t, err, "cluster.node_id")
}

func TestClusterAcknowledgesAfterTheSharedStoreByDefault(t *testing.T) {
	const rw = "storage:\n  remote_write:\n    enabled: true\n    url: http://127.0.0.1:8428/api/v1/write\n"
	tests := []struct {
		name string
		yaml string
		env  string
		want []string
	}{
		{"by default, the remote-write sink", rw + "cluster:\n  enabled: true\n", "", []string{"remote_write"}},
		{"none: after the local journal", rw + "cluster:\n  enabled: true\n  ack_after_sinks: []\n", "", []string{}},
		{"several, from the environment", rw + "cluster:\n  enabled: true\n", "remote_write,tsdb", []string{"remote_write", "tsdb"}},
		{"a slow sink with a longer ack_wait", rw + "    batch:\n      max_age: 2s\ncluster:\n  enabled: true\n  ack_wait: 6s\n  pinned_ttl: 7s\n", "", []string{"remote_write"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("CITYPULSE_CLUSTER_ACK_AFTER_SINKS", tc.env)
			}
			c, err := loadConfig(writeConfig(t, tc.yaml), nil)
			require.NoError(t, err)
			require.Equal(t, tc.want, c.Cluster.AckAfterSinks)
		})
	}
}

func TestStandbyConfigFromTheEnvironmentMirrorsTheClusterStreams(t *testing.T) {
	t.Setenv("CITYPULSE_CLUSTER_STANDBY_ENABLED", "true")
	t.Setenv("CITYPULSE_CLUSTER_STANDBY_SITE", "east")
	t.Setenv("CITYPULSE_CLUSTER_STANDBY_PEER_DOMAIN", "west")
	t.Setenv("CITYPULSE_CLUSTER_STANDBY_RPO_BUDGET", "10s")
	t.Setenv("CITYPULSE_CLUSTER_STATE_DEVICES_BUCKET", "DEVS")
	t.Setenv("CITYPULSE_CLUSTER_STATE_SILENCES_BUCKET", "SILS")
	c, err := loadConfig(writeConfig(t, "cluster:\n  enabled: true\nstorage:\n  remote_write:\n    enabled: true\n    url: http://127.0.0.1:8428/api/v1/write\n"), nil)
	require.NoError(t, err)
	sc := c.Cluster.standby()
	require.True(t, c.Cluster.Standby.Enabled)
	require.Equal(t, "east", sc.Site)
	require.Equal(t, "west", sc.PeerDomain)
	require.Equal(t, 10*time.Second, sc.RPOBudget)
	require.Equal(t, []string{"CITYPULSE_READINGS", "OBJ_CITYPULSE_STATE", "CITYPULSE_STATE_LOG", "KV_DEVS", "KV_SILS"}, sc.Streams,
		"by default the readings and the state's streams, by the names configured")

	t.Setenv("CITYPULSE_CLUSTER_STANDBY_STREAMS", "CITYPULSE_READINGS,KV_DEVS")
	c, err = loadConfig(writeConfig(t, "cluster:\n  enabled: true\nstorage:\n  remote_write:\n    enabled: true\n    url: http://127.0.0.1:8428/api/v1/write\n"), nil)
	require.NoError(t, err)
	require.Equal(t, []string{"CITYPULSE_READINGS", "KV_DEVS"}, c.Cluster.standby().Streams)
}

func TestBadClusterConfigIsRejectedWithTheKeyNamed(t *testing.T) {
	const rw = "storage:\n  remote_write:\n    enabled: true\n    url: http://127.0.0.1:8428/api/v1/write\n"
	tests := []struct {
		name string
		yaml string
		want string
	}{
		{"no shared store", "cluster:\n  enabled: true\n", "storage.remote_write.enabled"},
		{"a node id that is not a subject token", rw + "cluster:\n  enabled: true\n  node_id: node1.example.org\n", "cluster.node_id"},
		{"the removed nodes and index", rw + "cluster:\n  enabled: true\n  nodes: 3\n  index: 1\n", "give each node a unique, stable cluster.node_id"},
		{"the removed index alone", rw + "cluster:\n  enabled: true\n  index: 0\n", "cluster.index is no longer a key"},
		{"no NATS server", rw + "cluster:\n  enabled: true\n  urls: []\n", "cluster.urls"},
		{"a URL that is not NATS", rw + "cluster:\n  enabled: true\n  urls: [http://x:4222]\n", "cluster.urls"},
		{"a user without a password", rw + "cluster:\n  enabled: true\n  user: citypulse\n", "cluster.password"},
		{"a token and a user", rw + "cluster:\n  enabled: true\n  user: a\n  password: b\n  token: c\n", "cluster.token"},
		{"an ack wait beyond the pin", rw + "cluster:\n  enabled: true\n  ack_wait: 10s\n", "cluster.ack_wait"},
		{"an unknown key", rw + "cluster:\n  enabled: true\n  partitons: 3\n", "partitons"},
		{"no query API for the shared store", "storage:\n  remote_write:\n    enabled: true\n    url: http://127.0.0.1:9009/api/v1/push\ncluster:\n  enabled: true\n", "storage.remote_write.query_url"},
		{"a query URL that is not http", rw + "    query_url: ftp://x\ncluster:\n  enabled: true\n", "storage.remote_write.query_url"},
		{"a standby without its site", rw + "cluster:\n  enabled: true\n  standby:\n    enabled: true\n    peer_domain: b\n", "cluster.standby.site"},
		{"a standby whose peer is itself", rw + "cluster:\n  enabled: true\n  standby:\n    enabled: true\n    site: a\n    peer_domain: a\n", "cluster.standby.peer_domain"},
		{"a standby polling slower than its budget", rw + "cluster:\n  enabled: true\n  standby:\n    enabled: true\n    site: a\n    peer_domain: b\n    rpo_budget: 1s\n    poll_interval: 2s\n", "cluster.standby.poll_interval"},
		{"a standby with 2 replicas", rw + "cluster:\n  enabled: true\n  standby:\n    enabled: true\n    site: a\n    peer_domain: b\n    replicas: 2\n", "cluster.standby.replicas"},
		{"an unknown standby key", rw + "cluster:\n  enabled: true\n  standby:\n    rpo: 1s\n", "rpo"},
		{"acknowledging after a sink not configured", rw + "cluster:\n  enabled: true\n  ack_after_sinks: [influx]\n", `cluster.ack_after_sinks: "influx" is not a configured sink`},
		{"acknowledging after a sink named twice", rw + "cluster:\n  enabled: true\n  ack_after_sinks: [remote_write, remote_write]\n", "cluster.ack_after_sinks names \"remote_write\" twice"},
		{"acknowledging after a sink that flushes too late for ack_wait", rw + "    batch:\n      max_age: 1100ms\ncluster:\n  enabled: true\n", "more than a third of cluster.ack_wait"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadConfig(writeConfig(t, tc.yaml), nil)
			require.ErrorContains(t, err, tc.want)
		})
	}
}
