// A bare array (PM2 accepts it as well as {apps: [...]}) in a .cjs file, as projects
// with "type": "module" in package.json write it.
module.exports = [
  {
    script: '../../apps/node_hello.js',
    instances: -1,
    exec_mode: 'cluster_mode',
    exp_backoff_restart_delay: 100,
    shutdown_with_message: true,
    wait_ready: true,
    port: 18751,
    time: true,
    out_file: './logs/api-out.log',
    error_file: './logs/api-err.log',
    log_file: './logs/api-combined.log',
    env: { NODE_ENV: 'production' },
  },
  {
    name: 'scheduler',
    script: '../../apps/idle.py',
    cron_restart: '0 3 * * *',
    autorestart: false,
  },
];
