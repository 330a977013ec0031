// Command citypulse is the CityPulse server: it wires the gateways, the
// pipeline and the stores from the config and runs them until SIGINT/SIGTERM.
//
//	citypulse serve [--config configs/citypulse.yaml] [--data-dir DIR]
//	                [--mqtt-addr :1883] [--coap-addr :5683] [--http-addr :8080]
//	citypulse demo  [--seed N] [--first-incident 75s] [--incident-lasts 2m] [serve's flags]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "citypulse:", err)
		os.Exit(1)
	}
}

const usage = `usage: citypulse <command> [flags]

commands:
  serve     run the server (gateways, pipeline, stores, HTTP API)
  demo      run the server on its embedded defaults with a simulated city feeding it
  config    print the effective config (secrets masked) and exit
  standby   disaster recovery: standby <activate|promote|salvage|demote> [--peer-down] [--discard-tail]
            (asks the node at http.addr of the config, with http.admin_token)
  version   print the version

run 'citypulse serve -h' for the flags.`

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return errors.New("no command")
	}
	switch args[0] {
	case "serve", "config", "demo":
	case "standby":
		return runStandby(args[1:], stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "citypulse", version)
		return nil
	case "-h", "--help", "help":
		fmt.Fprintln(stdout, usage)
		return nil
	default:
		fmt.Fprintln(stderr, usage)
		return fmt.Errorf("unknown command %q", args[0])
	}
	fs := flag.NewFlagSet("citypulse "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	defaultConfig := "configs/citypulse.yaml"
	if args[0] == "demo" {
		defaultConfig = "" // the embedded defaults
	}
	cfgPath := fs.String("config", defaultConfig, "config file (YAML); every key can also be set by a CITYPULSE_<SECTION>_<KEY> environment variable")
	fs.String("data-dir", "", "data directory (data_dir)")
	fs.String("mqtt-addr", "", "embedded MQTT broker listen address (ingest.mqtt.addr, default :1883)")
	fs.String("coap-addr", "", "CoAP UDP listen address (ingest.coap.addr, default :5683)")
	fs.String("dtls-addr", "", "CoAP DTLS listen address (ingest.coap.dtls_addr, default :5684)")
	fs.String("http-addr", "", "HTTP API listen address (http.addr, default :8080)")
	fs.String("devices", "", "device list (devices.file, default configs/devices.yaml; the demo writes its own)")
	var demoOpts demoOptions
	if args[0] == "demo" {
		demoOpts.register(fs)
	}
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	overrides := map[string]any{}
	for flagName, key := range map[string]string{
		"data-dir": "data_dir", "mqtt-addr": "ingest.mqtt.addr", "coap-addr": "ingest.coap.addr",
		"dtls-addr": "ingest.coap.dtls_addr", "http-addr": "http.addr", "devices": "devices.file",
	} {
		if isSet(fs, flagName) {
			overrides[key] = fs.Lookup(flagName).Value.String()
		}
	}
	cfg, err := loadConfig(*cfgPath, overrides)
	if err != nil {
		return err
	}
	switch args[0] {
	case "config":
		return printConfig(stdout, cfg)
	case "demo":
		// a data dir of the user's (flag, variable or config file) is kept
		tmp := !isSet(fs, "data-dir") && os.Getenv("CITYPULSE_DATA_DIR") == "" && *cfgPath == ""
		d, err := newDemo(cfg, demoOpts, tmp, stderr)
		if err != nil {
			return err
		}
		fmt.Fprint(stdout, d.Banner(demoOpts))
		return runWithSignals(d, d.s)
	}
	s, err := newServer(cfg, stderr)
	if err != nil {
		return err
	}
	return runWithSignals(s, s)
}

// runWithSignals runs r (the server s, or the demo around it); SIGINT and
// SIGTERM stop it, SIGHUP reloads s's rules. This is the one place the
// server meets signals.
func runWithSignals(r runner, s *server) error {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	for {
		select {
		case err := <-done:
			return err
		case sig := <-sigs:
			if sig != syscall.SIGHUP {
				stop()
				continue
			}
			if err := s.Reload(); err == nil {
				s.log.Info("rules reloaded on SIGHUP")
			}
		}
	}
}

func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			set = true
		}
	})
	return set
}

var version = "dev"
