# Starts a child (a sleep in its process group) and exits at once: a crash loop that
# leaves an orphan behind on every run. Run with interpreter = "/bin/sh".
sleep 1000 &
exit 0
